package channels

// TLS test hooks, compiled only into this package's tests.

// TLSHandshakes returns how many TLS handshakes the node completed, in
// full and resumed, as dialer and as listener.
func (n *Node) TLSHandshakes() (full, resumed uint64) {
	return n.tls.full.Load(), n.tls.resumed.Load()
}

// DropSessions closes the node's sessions with peer iid, as a lost
// connection would.
func (n *Node) DropSessions(iid string) {
	n.mu.Lock()
	var drop []*session
	if p := n.peers[iid]; p != nil {
		drop = append(drop, p.sessions...)
	}
	n.mu.Unlock()
	for _, s := range drop {
		s.ys.Close()
	}
}
