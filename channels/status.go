package channels

import (
	"cmp"
	"crypto/tls"
	"net"
	"slices"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/mux"
)

// Status is a snapshot of a node for status pages: the members it knows,
// its sessions and its channels.
type Status struct {
	IID, Role string
	// Addr is where the node listens; "" when it does not.
	Addr string
	// TLS says that sessions run mutual TLS.
	TLS bool
	// Insecure says that sessions without TLS are allowed with peers at
	// any address (Config.Insecure, without TLS).
	Insecure bool
	// Members is the latest member list, sorted by IID, with how this
	// node reaches each one.
	Members []MemberStatus
	// Sessions are the live sessions, sorted by peer and then by age
	// (oldest first); each peer is a member.
	Sessions []SessionStatus
	// Channels are the channels registered on the node, sorted by name.
	Channels []ChannelStatus
	// Limits counts what the node's sessions turned away or held back
	// since it started, and the process's splicing pipes.
	Limits Limits
}

// Limits counts what a node's sessions, live or ended, turned away or held
// back to stay within the multiplexer's limits (docs/limits.md); the
// counters only grow. The pipe figures are the process's.
type Limits struct {
	// RefusedBacklog counts the peers' streams reset because the
	// session's accept backlog was full; RefusedStreams those reset
	// because the peer had too many streams open; RefusedMemory those
	// reset because data arrived on them while the session held
	// Config.MaxSessionBuffered bytes that nothing had read.
	RefusedBacklog, RefusedStreams, RefusedMemory uint64
	// RefusalStalls counts the times a session stopped reading because
	// its peer opened streams faster than it read their resets.
	RefusalStalls uint64
	// PongsDropped counts the peers' pings left unanswered.
	PongsDropped uint64
	// LossWaits counts the times a session's write deadline was moved on
	// because TCP was retransmitting (mux.Config.WriteTimeout).
	LossWaits uint64
	// PipesOpen and PipeLimit are the kernel pipes for splicing open now
	// and the most allowed; PipeShortages counts the times data was
	// copied for want of one.
	PipesOpen, PipeLimit int
	PipeShortages        uint64
}

func addLimits(a, b mux.LimitStats) mux.LimitStats {
	a.RefusedBacklog += b.RefusedBacklog
	a.RefusedStreams += b.RefusedStreams
	a.RefusedMemory += b.RefusedMemory
	a.RefusalStalls += b.RefusalStalls
	a.PongsDropped += b.PongsDropped
	a.LossWaits += b.LossWaits
	return a
}

// Member states in MemberStatus.State.
const (
	// MemberSelf is the node itself.
	MemberSelf = "self"
	// MemberUp: at least one session with the member is open.
	MemberUp = "up"
	// MemberConnecting: the first session is being dialed.
	MemberConnecting = "connecting"
	// MemberBackoff: the last dials failed; the next waits until RetryAt.
	MemberBackoff = "backoff"
	// MemberIdle: no session; one is dialed with the first stream, or the
	// member dials this node.
	MemberIdle = "idle"
)

// MemberStatus is one member and the node's sessions with it.
type MemberStatus struct {
	Member
	// State is one of MemberSelf, MemberUp, MemberConnecting,
	// MemberBackoff and MemberIdle.
	State string
	// Sessions is how many sessions with the member are open.
	Sessions int
	// Failures counts the dials that failed in a row, LastError says why
	// the last one failed, and RetryAt is when the next may start.
	Failures  int
	LastError string
	RetryAt   time.Time
}

// SessionStatus describes one live session.
type SessionStatus struct {
	// Peer and Role are what the peer's handshake said (and, with TLS,
	// its certificate proved).
	Peer, Role string
	// Net is the network the session runs over: tcp, unix (the same-host
	// socket) or memory.
	Net                   string
	LocalAddr, RemoteAddr string
	// Dialed says this node dialed the session; otherwise it accepted it.
	Dialed bool
	// Identity is the identity in the peer's TLS certificate: its first
	// URI SAN (tcpproxy://instance/... or spiffe://...), else its subject
	// common name; "" on a plaintext session.
	Identity string
	// Auth is how the peer was authenticated as its member: "tls" (its
	// certificate), or without TLS "dialed" (this node dialed the
	// member's address), "address" (it came from the member's address,
	// Config.Insecure) or "same-host" (from this network namespace).
	Auth string
	// Retiring says the session takes no new streams and closes once its
	// streams end (Config.MaxSessionAge).
	Retiring bool
	// Established is when the handshake completed.
	Established time.Time
	// RTT is the smoothed round-trip time of the keepalive pings; 0 until
	// the first was answered.
	RTT time.Duration
	// BytesSent and BytesReceived count stream data both ways, without the
	// multiplexer's framing.
	BytesSent, BytesReceived uint64
	// Streams is how many streams are open on the session.
	Streams int
	// Stalled says that a write to the session's connection has waited
	// for seconds without progress (its link carries nothing for now, or
	// the peer does not read): new streams go on other sessions.
	Stalled bool
}

// ChannelStatus describes one channel registered on the node.
type ChannelStatus struct {
	Name string
	// Kind is request, reply or duplex.
	Kind string
	// Target is, for a request channel, the channel it opens on its
	// members.
	Target string
	// Members are the IIDs of the remote members that a request channel
	// sends to (those serving Target) or a duplex channel's members;
	// empty for a reply channel, which only accepts.
	Members []string
}

// sessionInfo is what a session knows from its start.
type sessionInfo struct {
	dialed      bool
	established time.Time
	identity    string
}

func newSessionInfo(conn net.Conn, dialed bool) sessionInfo {
	info := sessionInfo{dialed: dialed, established: time.Now()}
	if tc, ok := conn.(*tls.Conn); ok {
		if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
			info.identity = certs[0].Subject.CommonName
			if len(certs[0].URIs) > 0 {
				info.identity = certs[0].URIs[0].String()
			}
		}
	}
	return info
}

// Status returns a snapshot of the node.
func (n *Node) Status() Status {
	n.mu.Lock()
	st := Status{IID: n.cfg.IID, Role: n.cfg.Role, TLS: n.cfg.TLS != nil, Insecure: n.plaintextAnywhere()}
	if n.ln != nil {
		st.Addr = n.ln.Addr().String()
	}
	var sessions []*session
	for iid, m := range n.members.byIID {
		ms := MemberStatus{Member: m, State: MemberIdle}
		p := n.peers[iid]
		switch {
		case iid == n.cfg.IID:
			ms.State = MemberSelf
		case p == nil:
		default:
			_, _, ms.Sessions = p.live()
			ms.Failures, ms.RetryAt = p.failures, p.retryAt
			if p.lastErr != nil {
				ms.LastError = p.lastErr.Error()
			}
			switch {
			case ms.Sessions > 0:
				ms.State = MemberUp
			case p.dial != nil:
				ms.State = MemberConnecting
			case p.failures > 0:
				ms.State = MemberBackoff
			}
		}
		st.Members = append(st.Members, ms)
	}
	for _, p := range n.peers {
		sessions = append(sessions, p.sessions...)
	}
	// Every session is counted once: in ended once removed from its
	// peer, else here, ended or not.
	limits := n.ended
	for _, r := range n.requests {
		st.Channels = append(st.Channels, ChannelStatus{Name: r.name, Kind: "request", Target: r.target, Members: iids(n.serving(r.target))})
	}
	for _, d := range n.duplexes {
		st.Channels = append(st.Channels, ChannelStatus{Name: d.name, Kind: "duplex", Members: iids(n.serving(d.name))})
	}
	for name := range n.queues {
		if !slices.ContainsFunc(n.duplexes, func(d *duplexChannel) bool { return d.name == name }) {
			st.Channels = append(st.Channels, ChannelStatus{Name: name, Kind: "reply"})
		}
	}
	n.mu.Unlock()

	// Counters are read outside n.mu: NumStreams takes the session's lock.
	for _, s := range sessions {
		limits = addLimits(limits, s.ys.LimitStats())
		if s.ys.IsClosed() {
			continue
		}
		ms := s.ys.Stats()
		st.Sessions = append(st.Sessions, SessionStatus{
			Peer: s.hello.IID, Role: s.hello.Role, Net: s.net,
			LocalAddr: s.ys.LocalAddr().String(), RemoteAddr: s.ys.RemoteAddr().String(),
			Dialed: s.info.dialed, Identity: s.info.identity, Established: s.info.established,
			Auth: s.auth, Retiring: s.isRetiring(),
			RTT: ms.RTT, BytesSent: ms.BytesSent, BytesReceived: ms.BytesReceived, Streams: ms.Streams,
			Stalled: s.ys.Stalled() >= stallAvoid,
		})
	}
	sp := mux.SpliceStats()
	st.Limits = Limits{
		RefusedBacklog: limits.RefusedBacklog, RefusedStreams: limits.RefusedStreams,
		RefusedMemory: limits.RefusedMemory,
		RefusalStalls: limits.RefusalStalls, PongsDropped: limits.PongsDropped, LossWaits: limits.LossWaits,
		PipesOpen: sp.PipesOpen, PipeLimit: sp.PipeLimit, PipeShortages: sp.PipeShortages,
	}
	slices.SortFunc(st.Members, func(a, b MemberStatus) int { return cmp.Compare(a.IID, b.IID) })
	slices.SortFunc(st.Sessions, func(a, b SessionStatus) int {
		return cmp.Or(cmp.Compare(a.Peer, b.Peer), a.Established.Compare(b.Established))
	})
	slices.SortFunc(st.Channels, func(a, b ChannelStatus) int { return cmp.Compare(a.Name, b.Name) })
	return st
}

func iids(ms []Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.IID
	}
	return out
}
