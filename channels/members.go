package channels

import (
	"cmp"
	"context"
	"maps"
	"slices"
	"sync"
	"time"
)

// memberState is the node's latest view of the mesh, guarded by Node.mu.
type memberState struct {
	known bool // a list has arrived (Start waits for the first)
	byIID map[string]Member
	// changed is closed when the next list is installed.
	changed chan struct{}
}

// memberGrace is how long a handshake from an instance that is not (yet)
// a member waits for a membership update that lists it, within the
// handshake's time: an instance that just joined may dial before the
// update reaches this node. (A variable for tests.)
var memberGrace = time.Second

// waitMember returns the member iid, waiting for it up to n.memberGrace
// and no later than three quarters of the way to ctx's deadline, so that
// a refusal can still be sent in time.
func (n *Node) waitMember(ctx context.Context, iid string) (Member, bool) {
	end := time.Now().Add(n.memberGrace)
	if d, ok := ctx.Deadline(); ok && d.Add(-time.Until(d)/4).Before(end) {
		end = d.Add(-time.Until(d) / 4)
	}
	timer := time.NewTimer(time.Until(end))
	defer timer.Stop()
	for {
		n.mu.Lock()
		m, ok := n.members.byIID[iid]
		changed := n.members.changed
		n.mu.Unlock()
		if ok || !time.Now().Before(end) || changed == nil {
			return m, ok
		}
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
		}
	}
}

// setMembers installs a new member list and tells the duplex watchers whose
// view changed.
func (n *Node) setMembers(list []Member) {
	byIID := make(map[string]Member, len(list))
	for _, m := range list {
		if m.IID == "" {
			n.log.Warn("membership: ignoring a member without iid", "addr", m.Addr)
			continue
		}
		if _, dup := byIID[m.IID]; dup {
			n.log.Warn("membership: duplicate iid; keeping the first", "member", m.IID)
			continue
		}
		byIID[m.IID] = m
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	if n.members.changed != nil {
		close(n.members.changed)
	}
	n.members = memberState{known: true, byIID: byIID, changed: make(chan struct{})}
	for _, d := range n.duplexes {
		d.update(n.serving(d.name))
	}
	// Sessions whose peer is no longer the member it was authenticated
	// as: it left, or its role or (without TLS) its address changed.
	var stale []*session
	for iid, p := range n.peers {
		m, ok := byIID[iid]
		for _, s := range p.sessions {
			if !ok || !sameIdentity(m, s.member, s.auth) {
				stale = append(stale, s)
			}
		}
		if !ok && len(p.sessions) == 0 && p.dial == nil {
			delete(n.peers, iid) // its backoff, if any, is moot
		}
	}
	n.mu.Unlock()
	for _, s := range stale {
		s.log.Info("closing session: the peer left the membership or changed its role or address")
		if !n.spawn(func() { s.ys.Close() }) {
			s.ys.Close()
		}
	}
}

// serving returns the remote members serving channel name, sorted by IID.
// n.mu must be held.
func (n *Node) serving(name string) []Member {
	var out []Member
	for _, m := range n.members.byIID {
		if m.IID != n.cfg.IID && m.Serves(name) {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b Member) int { return cmp.Compare(a.IID, b.IID) })
	return out
}

// member returns the member with the given iid.
func (n *Node) member(iid string) (Member, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m, ok := n.members.byIID[iid]
	return m, ok
}

func sameMembers(a, b []Member) bool {
	return slices.EqualFunc(a, b, func(x, y Member) bool {
		return x.IID == y.IID && x.Role == y.Role && x.Addr == y.Addr && maps.Equal(x.Channels, y.Channels)
	})
}

// watcher is one DuplexChannel.Watch subscription. Its channel holds at
// most the latest view: offer replaces an unread view instead of blocking,
// so a slow receiver never stalls the node and always ends up with the
// newest state.
type watcher struct {
	mu     sync.Mutex
	ch     chan []Member
	closed bool
	stop   func() bool // stops the context.AfterFunc that ends the watch
}

func (w *watcher) offer(view []Member) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	select {
	case <-w.ch: // drop the unread, older view
	default:
	}
	w.ch <- slices.Clone(view) // cannot block: we are the only sender
}

func (w *watcher) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.closed = true
		close(w.ch)
	}
}
