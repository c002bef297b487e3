// The three kinds of channel a Node serves: request (Open, balanced over
// the members that serve the target), reply (Accept) and duplex (Watch,
// Open to a member, Accept).

package channels

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// requestChannel implements RequestChannel.
type requestChannel struct {
	n        *Node
	name     string
	target   string
	balancer Balancer

	mu     sync.Mutex
	active map[string]int // open streams per member iid
}

func (r *requestChannel) Name() string { return r.name }

// Open opens a stream to a member serving r.target. The header's Channel
// and SourceIID are filled in by the node; the ports are the caller's.
// When no member can be reached but some failed in passing, it tries
// them all again as their backoff allows (openRetrying).
func (r *requestChannel) Open(ctx context.Context, h Header) (st Stream, m Member, err error) {
	err = r.n.openRetrying(ctx, func() error {
		st, m, err = r.openOnce(ctx, h)
		return err
	})
	return st, m, err
}

// openOnce tries every member serving r.target once, those whose sessions
// are all stalled last. Its error says when the soonest of the members
// that failed in passing may be dialed again (retryAt).
func (r *requestChannel) openOnce(ctx context.Context, h Header) (Stream, Member, error) {
	r.n.mu.Lock()
	if r.n.closed {
		r.n.mu.Unlock()
		return nil, Member{}, ErrClosed
	}
	cands := r.n.serving(r.target)
	r.n.mu.Unlock()
	if len(cands) == 0 {
		return nil, Member{}, fmt.Errorf("request channel %q: no member serves %q: %w", r.name, r.target, ErrNoMembers)
	}
	h.Channel, h.SourceIID = r.target, r.n.cfg.IID
	var (
		errs    []error
		stalled []Member // every session to them is stalled: tried last
	)
	for len(cands) > 0 {
		m := cands[r.pick(cands)]
		st, err := r.openMember(ctx, m, h, len(cands) == 1 && len(stalled) == 0)
		if err == nil {
			return st, m, nil
		}
		if errors.Is(err, errStalled) {
			stalled = append(stalled, m)
		} else {
			errs = append(errs, err)
		}
		if errors.Is(err, ErrClosed) {
			stalled = nil
			break
		}
		if ctx.Err() != nil {
			break
		}
		cands = removeMember(cands, m.IID)
	}
	// No other member could be reached: a stalled session may yet recover.
	for _, m := range stalled {
		if ctx.Err() != nil {
			break
		}
		r.add(m.IID, 1) // as pick does
		st, err := r.openMember(ctx, m, h, true)
		if err == nil {
			return st, m, nil
		}
		errs = append(errs, err)
	}
	err := fmt.Errorf("request channel %q: no member serving %q could be reached: %w: %w",
		r.name, r.target, ErrNoMembers, errors.Join(errs...))
	var (
		soonest time.Time
		soon    bool
	)
	for _, e := range errs {
		at, s := retryAt(e)
		if !at.IsZero() && (soonest.IsZero() || at.Before(soonest)) {
			soonest = at
		}
		soon = soon || s
	}
	if !soonest.IsZero() {
		return nil, Member{}, &retryable{at: soonest, soon: soon, err: err}
	}
	return nil, Member{}, err
}

// openMember opens a stream to m, which pick counted as active: the count
// goes back down when the stream ends, or at once if there is none.
func (r *requestChannel) openMember(ctx context.Context, m Member, h Header, lastResort bool) (Stream, error) {
	st, err := r.n.openTo(ctx, m, h, lastResort, func() { r.add(m.IID, -1) })
	if err != nil {
		r.add(m.IID, -1) // release is only called for a stream we got
	}
	return st, err
}

// pick asks the balancer and counts the stream as active at once, so that
// concurrent Opens see each other.
func (r *requestChannel) pick(members []Member) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	cands := make([]Candidate, len(members))
	for i, m := range members {
		cands[i] = Candidate{Member: m, Active: r.active[m.IID]}
	}
	i := r.balancer.Pick(cands)
	if i < 0 || i >= len(cands) {
		i = 0
	}
	r.active[members[i].IID]++
	return i
}

func (r *requestChannel) add(iid string, delta int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.active[iid] += delta
	if r.active[iid] <= 0 {
		delete(r.active, iid)
	}
}

func removeMember(ms []Member, iid string) []Member {
	out := ms[:0:0]
	for _, m := range ms {
		if m.IID != iid {
			out = append(out, m)
		}
	}
	return out
}

// replyChannel implements ReplyChannel.
type replyChannel struct {
	n     *Node
	name  string
	queue chan Incoming
}

func (c *replyChannel) Name() string { return c.name }

func (c *replyChannel) Accept(ctx context.Context) (Incoming, error) {
	return c.n.accept(ctx, c.queue)
}

// accept waits for the next stream queued for a channel.
func (n *Node) accept(ctx context.Context, q chan Incoming) (Incoming, error) {
	select {
	case <-n.done:
		return Incoming{}, ErrClosed
	default:
	}
	select {
	case inc := <-q:
		return inc, nil
	case <-ctx.Done():
		return Incoming{}, ctx.Err()
	case <-n.done:
		return Incoming{}, ErrClosed
	}
}

// duplexChannel implements DuplexChannel.
type duplexChannel struct {
	n     *Node
	name  string
	queue chan Incoming

	// Guarded by n.mu.
	view      []Member
	published bool
	watchers  map[*watcher]struct{}
}

func (d *duplexChannel) Name() string { return d.name }

func (d *duplexChannel) Accept(ctx context.Context) (Incoming, error) {
	return d.n.accept(ctx, d.queue)
}

// Open opens a stream to the member iid. The header's Channel and SourceIID
// are filled in by the node; the ports are the caller's.
// A member whose dials fail in passing is dialed again as the backoff
// allows (openRetrying), as long as it stays a member.
func (d *duplexChannel) Open(ctx context.Context, iid string, h Header) (Stream, error) {
	if iid == d.n.cfg.IID {
		return nil, fmt.Errorf("duplex channel %q: %q is this node", d.name, iid)
	}
	h.Channel, h.SourceIID = d.name, d.n.cfg.IID
	var st Stream
	err := d.n.openRetrying(ctx, func() error {
		m, ok := d.n.member(iid)
		if !ok || !m.Serves(d.name) {
			return fmt.Errorf("%q is not a member: %w", iid, ErrNoMembers)
		}
		var err error
		st, err = d.n.openTo(ctx, m, h, true, nil)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("duplex channel %q: %w", d.name, err)
	}
	return st, nil
}

// Watch publishes the channel's remote members; see DuplexChannel.
func (d *duplexChannel) Watch(ctx context.Context) <-chan []Member {
	w := &watcher{ch: make(chan []Member, 1)}
	d.n.mu.Lock()
	defer d.n.mu.Unlock()
	if d.n.closed {
		w.close()
		return w.ch
	}
	d.watchers[w] = struct{}{}
	if d.published {
		w.offer(d.view)
	}
	w.stop = context.AfterFunc(ctx, func() {
		d.n.mu.Lock()
		delete(d.watchers, w)
		d.n.mu.Unlock()
		w.close()
	})
	return w.ch
}

// update publishes view if it differs from the last one. n.mu must be held.
func (d *duplexChannel) update(view []Member) {
	if d.published && sameMembers(d.view, view) {
		return
	}
	d.view, d.published = view, true
	for w := range d.watchers {
		w.offer(view)
	}
}

// closeWatchers ends every watch at Close. n.mu must be held.
func (d *duplexChannel) closeWatchers() {
	for w := range d.watchers {
		w.stop()
		w.close()
	}
	clear(d.watchers)
}
