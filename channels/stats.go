package channels

// Sessions returns how many live sessions the node has, with all peers.
func (n *Node) Sessions() int {
	live := 0
	for _, k := range n.SessionsByNet() {
		live += k
	}
	return live
}

// SessionsByNet returns how many live sessions the node has, with all
// peers, by the network their connection runs over: "tcp", "unix" (the
// same-host socket, see TCPTransport) or "memory" (MemoryTransport).
// Networks without a live session are left out.
func (n *Node) SessionsByNet() map[string]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	live := make(map[string]int, 2)
	for _, p := range n.peers {
		for _, s := range p.sessions {
			if !s.ys.IsClosed() {
				live[s.net]++
			}
		}
	}
	return live
}
