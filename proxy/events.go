package proxy

import (
	"fmt"
	"net/netip"
	"sync"
)

// Event is one of Ready, Change, Synced, Error or Closed, delivered in
// order on Proxy.Events.
type Event interface{ event() }

// Ready says the proxy is up: legacy servers (reply, duplex bind) bind on
// BindIP, the instance's own IP. Every request listener and the first set
// of duplex impostors are open before Ready is sent.
type Ready struct {
	BindIP netip.Addr
}

// MemberAddr is one duplex member as the legacy program sees it.
type MemberAddr struct {
	IID  string
	IP   netip.Addr
	Port uint16
	// Self marks the local instance, listed so that a legacy program can
	// build a full cluster list (etcd's initial-cluster) from one event.
	Self bool
}

// Change reports a channel's new state.
//
// For a request channel, Listening, IP and Port say whether the legacy
// client can connect at IP:Port; it is sent when the listener opens and
// when it closes. For a duplex channel, Members is the whole membership
// (sorted by IID, the local instance included) after every change. Reply
// channels never change.
type Change struct {
	Channel string
	Kind    Kind

	Listening bool
	IP        netip.Addr
	Port      uint16

	Members []MemberAddr
}

// Error reports an initialisation or transport failure. It is an error.
type Error struct {
	Channel string // "" when not tied to one channel
	Err     error
}

func (e Error) Error() string {
	if e.Channel == "" {
		return e.Err.Error()
	}
	return fmt.Sprintf("channel %s: %v", e.Channel, e.Err)
}

func (e Error) Unwrap() error { return e.Err }

// Synced follows Ready and the first Change of every request and duplex
// channel, once: the initial state is complete, so a legacy program can be
// started with every address it needs, and every later Change is a change.
type Synced struct{}

// Closed is the last event: Shutdown has drained and released everything.
type Closed struct{}

func (Ready) event()  {}
func (Change) event() {}
func (Synced) event() {}
func (Error) event()  {}
func (Closed) event() {}

// eventQueue delivers events in order without ever blocking the proxy on a
// slow reader. Events are rare (start, membership changes, failures), so
// the queue stays small; it is drained by one goroutine that ends after
// delivering Closed, and it closes the output channel then.
type eventQueue struct {
	out chan Event

	mu      sync.Mutex
	pending []Event
	wake    chan struct{}
	closed  bool
	stop    chan struct{} // closed to abandon undelivered events
	done    chan struct{}
}

func newEventQueue() *eventQueue {
	q := &eventQueue{
		out:  make(chan Event, 16),
		wake: make(chan struct{}, 1),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	go q.run()
	return q
}

// push appends e; after Closed, further events are dropped.
func (q *eventQueue) push(e Event) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.pending = append(q.pending, e)
	if _, ok := e.(Closed); ok {
		q.closed = true
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *eventQueue) run() {
	defer close(q.done)
	defer close(q.out)
	for {
		q.mu.Lock()
		batch := q.pending
		q.pending = nil
		q.mu.Unlock()
		for _, e := range batch {
			select {
			case q.out <- e:
			case <-q.stop:
				return
			}
			if _, ok := e.(Closed); ok {
				return
			}
		}
		select {
		case <-q.wake:
		case <-q.stop:
			return
		}
	}
}

// abandon ends delivery: the reader stopped reading, and the queue's
// goroutine must not outlive the proxy.
func (q *eventQueue) abandon() {
	select {
	case <-q.stop:
	default:
		close(q.stop)
	}
	<-q.done
}
