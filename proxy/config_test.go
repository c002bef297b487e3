package proxy

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChannelConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  ChannelConfig
		want string
	}{
		{"db", ChannelConfig{Kind: "stream", Port: 1}, `channel "db": unknown kind "stream"`},
		{"db", ChannelConfig{Port: 1}, `channel "db": missing kind`},
		{"db", ChannelConfig{Kind: KindRequest}, `channel "db": missing port`},
		{"db", ChannelConfig{Kind: KindRequest, Port: 70000}, "port 70000 out of range 1-65535"},
		{"db", ChannelConfig{Kind: KindRequest, Port: -1}, "port -1 out of range"},
		{"db", ChannelConfig{Kind: KindReply, Port: 1, Mode: ModeBind}, `mode "bind" is only for duplex channels, not reply`},
		{"db", ChannelConfig{Kind: KindDuplex, Port: 1, Mode: "listen"}, `unknown mode "listen"`},
		{"db", ChannelConfig{Kind: KindReply, Port: 1, Target: "x"}, "only for request channels"},
		{"db", ChannelConfig{Kind: KindRequest, Port: 1, Balancer: "random"}, `unknown balancer "random"`},
		{"", ChannelConfig{Kind: KindRequest, Port: 1}, "channel name is empty"},
		{"a b", ChannelConfig{Kind: KindRequest, Port: 1}, "contains a space"},
		{strings.Repeat("x", 256), ChannelConfig{Kind: KindRequest, Port: 1}, "256 bytes long"},
	} {
		err := tc.cfg.Validate(tc.name)
		require.Error(t, err, "%+v", tc.cfg)
		assert.Contains(t, err.Error(), tc.want)
	}
	for _, ok := range []ChannelConfig{
		{Kind: KindRequest, Port: 80, Balancer: BalancerLeastStreams, Target: "web"},
		{Kind: KindReply, Port: 65535},
		{Kind: KindDuplex, Port: 2380},
		{Kind: KindDuplex, Port: 2380, Mode: ModeConnect},
	} {
		require.NoError(t, ok.Validate("ch"))
	}
}

func TestConfigValidateReportsEverything(t *testing.T) {
	cfg := Config{Channels: map[string]ChannelConfig{
		"a": {Kind: KindRequest},
		"b": {Kind: "x", Port: 1},
	}}
	err := cfg.Validate()
	require.Error(t, err)
	for _, want := range []string{"iid is empty", "role is empty", `channel "a": missing port`, `channel "b": unknown kind`, "no network", "no mesh"} {
		assert.Contains(t, err.Error(), want)
	}
}
