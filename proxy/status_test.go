package proxy_test

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// TestChannels: every kind of channel reports where its legacy connections
// are accepted and where incoming streams go, and duplex channels their
// members.
func TestChannels(t *testing.T) {
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	srv := c.Add("srv", "server", map[string]proxy.ChannelConfig{
		"db":   {Kind: proxy.KindReply, Port: 7000},
		"ring": {Kind: proxy.KindDuplex, Port: 7100, Mode: proxy.ModeBind},
	})
	cli := c.Add("cli", "client", map[string]proxy.ChannelConfig{
		"db":   {Kind: proxy.KindRequest, Port: 6000, Target: "db"},
		"ring": {Kind: proxy.KindDuplex, Port: 7100, Mode: proxy.ModeConnect},
		"sql":  {Kind: proxy.KindRequest, Port: 6001, Target: "db"},
	})
	require.Len(t, cli.Events.NextChange(t, "ring").Members, 2, "srv is known from the start")

	srvIP := cli.IPOf(t, "srv")
	got := cli.Proxy.Channels()
	require.Len(t, got, 3)
	assert.Equal(t, proxy.ChannelInfo{Channel: "db", Kind: proxy.KindRequest, Target: "db",
		Listen: []netip.AddrPort{cli.RequestAddr(t, "db")}}, got[0])
	assert.Equal(t, proxy.ChannelInfo{Channel: "ring", Kind: proxy.KindDuplex, Mode: proxy.ModeConnect,
		Listen: []netip.AddrPort{netip.AddrPortFrom(srvIP, 7100)},
		Members: []proxy.MemberAddr{
			{IID: "cli", IP: cli.Proxy.BindIP(), Port: 7100, Self: true},
			{IID: "srv", IP: srvIP, Port: 7100},
		}}, got[1])
	assert.Equal(t, "sql", got[2].Channel)
	assert.Equal(t, "db", got[2].Target)

	got = srv.Proxy.Channels()
	require.Len(t, got, 2)
	assert.Equal(t, proxy.ChannelInfo{Channel: "db", Kind: proxy.KindReply,
		Connect: netip.AddrPortFrom(srv.Proxy.BindIP(), 7000)}, got[0])
	assert.Equal(t, netip.AddrPortFrom(srv.Proxy.BindIP(), 7100), got[1].Connect)
	assert.Empty(t, got[1].Listen, "bind mode has no impostors")

	// An iid the proxy never assigned: the address it gives itself, and
	// looking it up assigns nothing.
	ip, ok := cli.Proxy.LookupInstanceIP("elsewhere")
	require.True(t, ok)
	want, err := proxy.BindIP(cli.Inst.Addressing, "elsewhere")
	require.NoError(t, err)
	assert.Equal(t, want, ip)
	assert.Equal(t, srvIP, must(cli.Proxy.LookupInstanceIP("srv")))
}

func must[T any](v T, ok bool) T {
	if !ok {
		panic("not found")
	}
	return v
}
