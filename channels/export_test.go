package channels

import "time"

// Test hooks, compiled only into this package's tests.

// NumSessions returns how many live sessions the node has with peer iid
// (Sessions counts them for all peers).
func (n *Node) NumSessions(iid string) int {
	return n.countSessions(iid, func(*session) bool { return true })
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
