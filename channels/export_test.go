package channels

import (
	"crypto/tls"
	"net"
)

// Test hooks, compiled only into this package's tests.

// NumSessions returns how many live sessions the node has with peer iid
// (Sessions counts them for all peers).
func (n *Node) NumSessions(iid string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.peers[iid]
	if p == nil {
		return 0
	}
	live := 0
	for _, s := range p.sessions {
		if !s.ys.IsClosed() {
			live++
		}
	}
	return live
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
