package channels

// Sessions returns how many live sessions the node has, with all peers.
func (n *Node) Sessions() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	live := 0
	for _, p := range n.peers {
		for _, s := range p.sessions {
			if !s.ys.IsClosed() {
				live++
			}
		}
	}
	return live
}
