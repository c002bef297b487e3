package channels

import (
	"crypto/tls"
	"net"
	"time"
)

// Test hooks, compiled only into this package's tests.

// NumSessions returns how many live sessions the node has with peer iid
// (Sessions counts them for all peers).
func (n *Node) NumSessions(iid string) int {
	return n.countSessions(iid, func(*session) bool { return true })
}

// Dialing reports whether the node is dialing peer iid.
func (n *Node) Dialing(iid string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.peers[iid]
	return p != nil && p.dial != nil
}

// countSessions counts the live sessions with peer iid that match f.
func (n *Node) countSessions(iid string, f func(*session) bool) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.peers[iid]
	if p == nil {
		return 0
	}
	k := 0
	for _, s := range p.sessions {
		if !s.ys.IsClosed() && f(s) {
			k++
		}
	}
	return k
}

// ActiveStreams returns a request channel's open-stream count per member.
func ActiveStreams(rc RequestChannel) map[string]int {
	r := rc.(*requestChannel)
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.active))
	for k, v := range r.active {
		out[k] = v
	}
	return out
}

// SetRefusalLogInterval sets how often refusals are summed up in the log,
// for nodes started afterwards; restore puts the default back.
func SetRefusalLogInterval(d time.Duration) (restore func()) {
	old := refusalLogInterval
	refusalLogInterval = d
	return func() { refusalLogInterval = old }
}

// MaxRefusalAddrs is how many addresses the refusal log tracks one by one.
const MaxRefusalAddrs = maxRefusalAddrs

// Retiring returns how many of the node's live sessions with peer iid are
// retiring (Config.MaxSessionAge).
func (n *Node) Retiring(iid string) int {
	return n.countSessions(iid, (*session).isRetiring)
}

// SetMemberGrace sets how long handshakes from non-members wait for the
// membership to list them, for nodes made afterwards.
func SetMemberGrace(d time.Duration) (restore func()) {
	old := memberGrace
	memberGrace = d
	return func() { memberGrace = old }
}

// NewRecordConn wraps c as a node's TLS transport does.
func NewRecordConn(c net.Conn) net.Conn { return newRecordConn(c) }

// SessionConn is what a session runs over, given its connection.
func SessionConn(c net.Conn) net.Conn { return sessionConn(c) }

// IsTLSSessionConn reports whether c batches its records.
func IsTLSSessionConn(c net.Conn) bool {
	_, ok := c.(*tlsSessionConn)
	return ok
}

// RecordConnReads returns the reads that reached the socket under the
// TLS connection tc, and whether it holds a read-ahead buffer.
func RecordConnReads(tc *tls.Conn) (reads int, holding bool) {
	rc := tc.NetConn().(*recordConn)
	return rc.readCalls, rc.buf != nil
}

// RecordConnReadsRaw reports whether c reads through its RawConn.
func RecordConnReadsRaw(c net.Conn) bool { return c.(*recordConn).rc != nil }

// StalledSessions counts the node's live sessions with peer iid whose
// write has waited without progress long enough for new streams to avoid
// them.
func (n *Node) StalledSessions(iid string) int {
	return n.countSessions(iid, func(s *session) bool { return s.ys.Stalled() >= stallAvoid })
}
