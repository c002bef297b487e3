package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tcpproxy/tcpproxy/channels"
)

// Mesh reports the mesh as one node sees it, read from the node's status
// at scrape time: sessions, streams and round-trip time per peer, and
// members by how they are reached.
type Mesh struct {
	status func() (channels.Status, bool)

	sessions *prometheus.Desc
	streams  *prometheus.Desc
	rtt      *prometheus.Desc
	members  *prometheus.Desc

	stalled *prometheus.Desc

	refused, stalls, pongs, lossWaits, pipes, pipeLimit, shortages *prometheus.Desc
}

// memberStates are always reported, at 0 when no member is in them, so
// that dashboards and alerts see the series.
var memberStates = []string{channels.MemberSelf, channels.MemberUp, channels.MemberConnecting, channels.MemberBackoff, channels.MemberIdle}

// NewMesh returns the mesh metrics of instance iid; status returns the
// node's status (channels.Node.Status), or false while there is no node.
func NewMesh(iid string, status func() (channels.Status, bool)) *Mesh {
	labels := prometheus.Labels{"iid": iid}
	return &Mesh{
		status: status,
		sessions: prometheus.NewDesc("tcpproxy_peer_sessions",
			"Live sessions with each peer, by the network they run over (tcp, or unix: the same-host socket).",
			[]string{"peer", "net"}, labels),
		streams: prometheus.NewDesc("tcpproxy_peer_streams",
			"Streams open on the sessions with each peer.", []string{"peer"}, labels),
		rtt: prometheus.NewDesc("tcpproxy_peer_rtt_seconds",
			"Round-trip time to each peer, smoothed from the sessions' keepalive pings (mean over its sessions).",
			[]string{"peer"}, labels),
		stalled: prometheus.NewDesc("tcpproxy_peer_sessions_stalled",
			"Sessions with each peer whose writes have waited for seconds without progress (the link carries nothing for now, or the peer does not read); new streams avoid them.",
			[]string{"peer"}, labels),
		members: prometheus.NewDesc("tcpproxy_mesh_members",
			"Members of the mesh by how this instance reaches them: self, up (a session is open), connecting, backoff (the last dials failed) or idle (no session needed yet).",
			[]string{"state"}, labels),
		refused: prometheus.NewDesc("tcpproxy_mux_streams_refused_total",
			"Streams a peer opened that the multiplexer reset, by reason: backlog (the session's accept backlog was full), streams (the peer had too many open) or memory (data arrived on them while the session held its limit of unread data). A tcpproxy peer waits rather than overflow the backlog.",
			[]string{"reason"}, labels),
		stalls: prometheus.NewDesc("tcpproxy_mux_refusal_stalls_total",
			"Times a session stopped reading because its peer opened streams faster than it read the resets refusing them.", nil, labels),
		pongs: prometheus.NewDesc("tcpproxy_mux_pongs_dropped_total",
			"Pings from peers left unanswered because too many answers waited to be written.", nil, labels),
		lossWaits: prometheus.NewDesc("tcpproxy_mux_loss_waits_total",
			"Times a session's write, waiting while TCP retransmitted data after losses or an outage, was given more time instead of ending the session.", nil, labels),
		pipes: prometheus.NewDesc("tcpproxy_splice_pipes",
			"Kernel pipes open for zero-copy splicing, idle ones included (two descriptors each).", nil, labels),
		pipeLimit: prometheus.NewDesc("tcpproxy_splice_pipes_limit",
			"The most kernel pipes open at once for splicing.", nil, labels),
		shortages: prometheus.NewDesc("tcpproxy_splice_pipe_shortages_total",
			"Times a pipe for splicing was wanted and none was available: the data was copied instead.", nil, labels),
	}
}

// Describe implements prometheus.Collector.
func (m *Mesh) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.sessions, m.streams, m.rtt, m.stalled, m.members,
		m.refused, m.stalls, m.pongs, m.lossWaits, m.pipes, m.pipeLimit, m.shortages} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *Mesh) Collect(ch chan<- prometheus.Metric) {
	st, ok := m.status()
	if !ok {
		return
	}
	type peerNet struct{ peer, net string }
	sessions := make(map[peerNet]int)
	streams, stalled := make(map[string]int), make(map[string]int)
	rttSum, rttN := make(map[string]float64), make(map[string]int)
	for _, s := range st.Sessions {
		sessions[peerNet{s.Peer, s.Net}]++
		streams[s.Peer] += s.Streams
		if s.Stalled {
			stalled[s.Peer]++
		} else if _, ok := stalled[s.Peer]; !ok {
			stalled[s.Peer] = 0 // the series exists while the peer has sessions
		}
		if s.RTT > 0 {
			rttSum[s.Peer] += s.RTT.Seconds()
			rttN[s.Peer]++
		}
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for k, n := range sessions {
		gauge(m.sessions, float64(n), k.peer, k.net)
	}
	for peer, n := range streams {
		gauge(m.streams, float64(n), peer)
	}
	for peer, n := range stalled {
		gauge(m.stalled, float64(n), peer)
	}
	for peer, sum := range rttSum {
		gauge(m.rtt, sum/float64(rttN[peer]), peer)
	}
	byState := make(map[string]int, len(memberStates))
	for _, mb := range st.Members {
		byState[mb.State]++
	}
	for _, s := range memberStates {
		gauge(m.members, float64(byState[s]), s)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	l := st.Limits
	counter(m.refused, l.RefusedBacklog, "backlog")
	counter(m.refused, l.RefusedStreams, "streams")
	counter(m.refused, l.RefusedMemory, "memory")
	counter(m.stalls, l.RefusalStalls)
	counter(m.pongs, l.PongsDropped)
	counter(m.lossWaits, l.LossWaits)
	gauge(m.pipes, float64(l.PipesOpen))
	gauge(m.pipeLimit, float64(l.PipeLimit))
	counter(m.shortages, l.PipeShortages)
}
