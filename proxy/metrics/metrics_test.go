package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/proxy"
)

type fixed []proxy.ChannelStats

func (f fixed) Stats() []proxy.ChannelStats { return f }

func TestCollector(t *testing.T) {
	c := NewCollector("web-1", fixed{
		{Channel: "db", Kind: proxy.KindRequest, Connections: 7, Active: 2, Failed: 1, Refused: 3, Reset: 4, BytesOut: 100, BytesIn: 200},
		{Channel: "peers", Kind: proxy.KindDuplex, Members: 3},
	})
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	want := `
# HELP tcpproxy_bytes_total Bytes carried; direction out is from the legacy program into the mesh.
# TYPE tcpproxy_bytes_total counter
tcpproxy_bytes_total{channel="db",direction="in",iid="web-1",kind="request"} 200
tcpproxy_bytes_total{channel="db",direction="out",iid="web-1",kind="request"} 100
tcpproxy_bytes_total{channel="peers",direction="in",iid="web-1",kind="duplex"} 0
tcpproxy_bytes_total{channel="peers",direction="out",iid="web-1",kind="duplex"} 0
# HELP tcpproxy_connections_active Proxied connections open now.
# TYPE tcpproxy_connections_active gauge
tcpproxy_connections_active{channel="db",iid="web-1",kind="request"} 2
tcpproxy_connections_active{channel="peers",iid="web-1",kind="duplex"} 0
# HELP tcpproxy_connections_refused_total Connections turned away at the channel's connection limit.
# TYPE tcpproxy_connections_refused_total counter
tcpproxy_connections_refused_total{channel="db",iid="web-1",kind="request"} 3
tcpproxy_connections_refused_total{channel="peers",iid="web-1",kind="duplex"} 0
# HELP tcpproxy_members Duplex members known, the local instance included.
# TYPE tcpproxy_members gauge
tcpproxy_members{channel="peers",iid="web-1",kind="duplex"} 3
`
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(want),
		"tcpproxy_bytes_total", "tcpproxy_connections_active", "tcpproxy_connections_refused_total", "tcpproxy_members"))
	n, err := testutil.GatherAndCount(reg)
	require.NoError(t, err)
	require.Equal(t, 17, n)
}

func TestTransportSessionsByNet(t *testing.T) {
	live := map[string]int{"unix": 2, "memory": 1}
	tr := NewTransport("web-1", func() map[string]int { return live })
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(tr))
	const head = `
# HELP tcpproxy_sessions Live sessions with other proxies, by the network they run over (tcp, or unix: the same-host socket).
# TYPE tcpproxy_sessions gauge
`
	// tcp and unix are always reported; other networks when live.
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(head+`tcpproxy_sessions{iid="web-1",net="memory"} 1
tcpproxy_sessions{iid="web-1",net="tcp"} 0
tcpproxy_sessions{iid="web-1",net="unix"} 2
`), "tcpproxy_sessions"))

	live = nil // the node is gone
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(head+`tcpproxy_sessions{iid="web-1",net="tcp"} 0
tcpproxy_sessions{iid="web-1",net="unix"} 0
`), "tcpproxy_sessions"))
}
