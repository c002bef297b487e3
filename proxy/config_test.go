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
	for _, want := range []string{"iid is empty", "role is empty", `channel "a": missing port`, `channel "b": unknown kind`} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestConfigMember(t *testing.T) {
	cfg := Config{IID: "etcd-1", Role: "etcd", Channels: map[string]ChannelConfig{
		"client": {Kind: KindReply, Port: 2379},
		"peers":  {Kind: KindDuplex, Port: 2380},
		"bound":  {Kind: KindDuplex, Port: 7001, Mode: ModeBind},
		"caller": {Kind: KindDuplex, Port: 7002, Mode: ModeConnect},
		"db":     {Kind: KindRequest, Port: 5432},
	}}
	m := cfg.Member("10.0.0.5:7000")
	assert.Equal(t, "etcd-1", m.IID)
	assert.Equal(t, "etcd", m.Role)
	assert.Equal(t, "10.0.0.5:7000", m.Addr)
	// Only what other instances can open streams to: reply channels and
	// duplex channels that bind.
	assert.Equal(t, map[string]uint16{"client": 2379, "peers": 2380, "bound": 7001}, m.Channels)
}
