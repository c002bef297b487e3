// Package membership provides channels.Source implementations: a fixed
// list, a list a program changes at run time, a watched YAML file, an etcd
// v3 registry in which every proxy registers itself under a lease, and the
// polled DNS records (SRV or A/AAAA) of a headless service.
package membership

import (
	"context"
	"maps"
	"slices"
	"sync"

	"github.com/tcpproxy/tcpproxy/channels"
)

// Static returns a Source that always publishes members.
func Static(members ...channels.Member) channels.Source {
	return static(clone(members))
}

type static []channels.Member

func (s static) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	ch := make(chan []channels.Member, 1)
	ch <- clone(s)
	// No goroutine: the channel is closed by the runtime's AfterFunc when
	// ctx ends.
	context.AfterFunc(ctx, func() { close(ch) })
	return ch, nil
}

// Dynamic is a Source whose member list is changed with Set, for tests of
// joins and leaves and for programs that learn membership themselves. The
// zero value is an empty list ready to use.
type Dynamic struct {
	mu       sync.Mutex
	members  []channels.Member
	watchers map[*latest]struct{}
}

// NewDynamic returns a Dynamic publishing members.
func NewDynamic(members ...channels.Member) *Dynamic {
	return &Dynamic{members: clone(members)}
}

// Set replaces the member list and publishes it to every watcher.
func (d *Dynamic) Set(members ...channels.Member) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.members = clone(members)
	for w := range d.watchers {
		w.offer(clone(d.members))
	}
}

// Members returns the current list.
func (d *Dynamic) Members() []channels.Member {
	d.mu.Lock()
	defer d.mu.Unlock()
	return clone(d.members)
}

// Watch implements channels.Source. A watcher that lags behind skips to
// the latest list.
func (d *Dynamic) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	w := newLatest()
	d.mu.Lock()
	if d.watchers == nil {
		d.watchers = make(map[*latest]struct{})
	}
	d.watchers[w] = struct{}{}
	w.offer(clone(d.members))
	d.mu.Unlock()
	context.AfterFunc(ctx, func() {
		d.mu.Lock()
		delete(d.watchers, w)
		d.mu.Unlock()
		w.close()
	})
	return w.ch, nil
}

// latest is a channel that holds only the newest unread value: offer
// replaces an unread value instead of blocking, so a slow receiver never
// stalls the publisher and always ends with the newest list.
type latest struct {
	mu     sync.Mutex
	ch     chan []channels.Member
	closed bool
}

func newLatest() *latest { return &latest{ch: make(chan []channels.Member, 1)} }

func (l *latest) offer(v []channels.Member) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	select {
	case <-l.ch:
	default:
	}
	l.ch <- v // cannot block: offer is the only sender, under l.mu
}

func (l *latest) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.ch)
	}
}

// clone deep-copies a member list, so that callers never share maps with
// the source.
func clone(ms []channels.Member) []channels.Member {
	if ms == nil {
		return []channels.Member{}
	}
	out := slices.Clone(ms)
	for i := range out {
		out[i].Channels = maps.Clone(out[i].Channels)
	}
	return out
}

// equal reports whether two lists are the same, in order.
func equal(a, b []channels.Member) bool {
	return slices.EqualFunc(a, b, func(x, y channels.Member) bool {
		return x.IID == y.IID && x.Role == y.Role && x.Addr == y.Addr && maps.Equal(x.Channels, y.Channels)
	})
}
