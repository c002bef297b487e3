package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

func TestMesh(t *testing.T) {
	st := channels.Status{
		Members: []channels.MemberStatus{
			{Member: channels.Member{IID: "a"}, State: channels.MemberSelf},
			{Member: channels.Member{IID: "b"}, State: channels.MemberUp},
			{Member: channels.Member{IID: "c"}, State: channels.MemberBackoff},
		},
		Sessions: []channels.SessionStatus{
			{Peer: "b", Net: "unix", RTT: 2 * time.Millisecond, Streams: 3},
			{Peer: "b", Net: "unix", RTT: 4 * time.Millisecond, Streams: 1, Stalled: true},
			{Peer: "d", Net: "tcp"}, // RTT not measured yet
		},
		Limits: channels.Limits{RefusedBacklog: 5, RefusedStreams: 1, RefusedMemory: 6, RefusalStalls: 2, PongsDropped: 3, LossWaits: 8,
			PipesOpen: 4, PipeLimit: 1024, PipeShortages: 7},
	}
	have := true
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(NewMesh("a", func() (channels.Status, bool) { return st, have })))
	want := `
# HELP tcpproxy_mesh_members Members of the mesh by how this instance reaches them: self, up (a session is open), connecting, backoff (the last dials failed) or idle (no session needed yet).
# TYPE tcpproxy_mesh_members gauge
tcpproxy_mesh_members{iid="a",state="backoff"} 1
tcpproxy_mesh_members{iid="a",state="connecting"} 0
tcpproxy_mesh_members{iid="a",state="idle"} 0
tcpproxy_mesh_members{iid="a",state="self"} 1
tcpproxy_mesh_members{iid="a",state="up"} 1
# HELP tcpproxy_mux_loss_waits_total Times a session's write, waiting while TCP retransmitted data after losses or an outage, was given more time instead of ending the session.
# TYPE tcpproxy_mux_loss_waits_total counter
tcpproxy_mux_loss_waits_total{iid="a"} 8
# HELP tcpproxy_mux_pongs_dropped_total Pings from peers left unanswered because too many answers waited to be written.
# TYPE tcpproxy_mux_pongs_dropped_total counter
tcpproxy_mux_pongs_dropped_total{iid="a"} 3
# HELP tcpproxy_mux_refusal_stalls_total Times a session stopped reading because its peer opened streams faster than it read the resets refusing them.
# TYPE tcpproxy_mux_refusal_stalls_total counter
tcpproxy_mux_refusal_stalls_total{iid="a"} 2
# HELP tcpproxy_mux_streams_refused_total Streams a peer opened that the multiplexer reset, by reason: backlog (the session's accept backlog was full), streams (the peer had too many open) or memory (data arrived on them while the session held its limit of unread data). A tcpproxy peer waits rather than overflow the backlog.
# TYPE tcpproxy_mux_streams_refused_total counter
tcpproxy_mux_streams_refused_total{iid="a",reason="backlog"} 5
tcpproxy_mux_streams_refused_total{iid="a",reason="memory"} 6
tcpproxy_mux_streams_refused_total{iid="a",reason="streams"} 1
# HELP tcpproxy_peer_rtt_seconds Round-trip time to each peer, smoothed from the sessions' keepalive pings (mean over its sessions).
# TYPE tcpproxy_peer_rtt_seconds gauge
tcpproxy_peer_rtt_seconds{iid="a",peer="b"} 0.003
# HELP tcpproxy_peer_sessions Live sessions with each peer, by the network they run over (tcp, or unix: the same-host socket).
# TYPE tcpproxy_peer_sessions gauge
tcpproxy_peer_sessions{iid="a",net="tcp",peer="d"} 1
tcpproxy_peer_sessions{iid="a",net="unix",peer="b"} 2
# HELP tcpproxy_peer_sessions_stalled Sessions with each peer whose writes have waited for seconds without progress (the link carries nothing for now, or the peer does not read); new streams avoid them.
# TYPE tcpproxy_peer_sessions_stalled gauge
tcpproxy_peer_sessions_stalled{iid="a",peer="b"} 1
tcpproxy_peer_sessions_stalled{iid="a",peer="d"} 0
# HELP tcpproxy_peer_streams Streams open on the sessions with each peer.
# TYPE tcpproxy_peer_streams gauge
tcpproxy_peer_streams{iid="a",peer="b"} 4
tcpproxy_peer_streams{iid="a",peer="d"} 0
# HELP tcpproxy_splice_pipe_shortages_total Times a pipe for splicing was wanted and none was available: the data was copied instead.
# TYPE tcpproxy_splice_pipe_shortages_total counter
tcpproxy_splice_pipe_shortages_total{iid="a"} 7
# HELP tcpproxy_splice_pipes Kernel pipes open for zero-copy splicing, idle ones included (two descriptors each).
# TYPE tcpproxy_splice_pipes gauge
tcpproxy_splice_pipes{iid="a"} 4
# HELP tcpproxy_splice_pipes_limit The most kernel pipes open at once for splicing.
# TYPE tcpproxy_splice_pipes_limit gauge
tcpproxy_splice_pipes_limit{iid="a"} 1024
`
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(want)))

	have = false // no node (yet, or any more): no series
	n, err := testutil.GatherAndCount(reg)
	require.NoError(t, err)
	require.Zero(t, n)
}
