package channels

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// ErrBackoff is matched (errors.Is) by the error of an Open to a peer whose
// last dials failed and whose next attempt is not due yet. Such an Open
// fails at once, so a RequestChannel moves on to another member instead of
// waiting.
var ErrBackoff = errors.New("peer unreachable, backing off")

// peer is the node's state for one remote instance, guarded by Node.mu.
type peer struct {
	// sessions are the live sessions with the peer, oldest first: usually
	// one, two when both sides dialed at the same time. Either works.
	sessions []*session
	// dial is the dial in flight, shared by every Open that needs it.
	dial *dialCall
	// failures counts dials failed in a row; retryAt is when the next may
	// start, and lastErr why the last failed.
	failures int
	retryAt  time.Time
	lastErr  error
}

type dialCall struct {
	done chan struct{}
	s    *session // set before done is closed
	err  error
}

// live returns the open session carrying the fewest streams (the newest
// of those tied), and how many sessions are open.
func (p *peer) live() (best *session, open int) {
	least := 0
	for i := len(p.sessions) - 1; i >= 0; i-- {
		s := p.sessions[i]
		if s.ys.IsClosed() {
			continue
		}
		open++
		if n := s.ys.NumStreams(); best == nil || n < least {
			best, least = s, n
		}
	}
	return best, open
}

// openTo opens a stream to member m. release is called once the stream has
// finished, only when openTo returned it.
func (n *Node) openTo(ctx context.Context, m Member, h Header, release func()) (Stream, error) {
	wh := wire.StreamHeader{Channel: h.Channel, SourceIID: h.SourceIID, SourcePort: h.SourcePort, TargetPort: h.TargetPort}
	var err error
	// A session can die between the lookup and the open; then the next
	// round dials a fresh one. Two rounds suffice: a session that dies
	// right after its own dial means the peer is going away.
	for range 2 {
		var s *session
		if s, err = n.sessionTo(ctx, m); err != nil {
			return nil, err
		}
		var st *stream
		if st, err = s.open(ctx, wh, release); err == nil {
			return st, nil
		}
		if !s.ys.IsClosed() {
			return nil, err
		}
	}
	return nil, err
}

// sessionTo returns a live session with m, dialing one if there is none.
func (n *Node) sessionTo(ctx context.Context, m Member) (*session, error) {
	n.mu.Lock()
	switch {
	case n.closed:
		n.mu.Unlock()
		return nil, ErrClosed
	case !n.started:
		n.mu.Unlock()
		return nil, errors.New("node not started")
	}
	p := n.peers[m.IID]
	if p == nil {
		p = &peer{}
		n.peers[m.IID] = p
	}
	if s, _ := p.live(); s != nil {
		n.mu.Unlock()
		return s, nil
	}
	call := p.dial
	if call == nil {
		if wait := time.Until(p.retryAt); wait > 0 {
			// p's fields belong to n.mu: read them before unlocking.
			err := fmt.Errorf("peer %s (%s): %w after %d failed dials, next attempt in %v: %w",
				m.IID, m.Addr, ErrBackoff, p.failures, wait.Round(time.Millisecond), p.lastErr)
			n.mu.Unlock()
			return nil, err
		}
		// The dial belongs to the node, not to this caller: a caller that
		// gives up must not fail the dial for the others waiting on it.
		call = &dialCall{done: make(chan struct{})}
		p.dial = call
		n.wg.Go(func() { n.runDial(p, m, call) }) // under n.mu and not closed: see spawn
	}
	n.mu.Unlock()
	select {
	case <-call.done:
		return call.s, call.err
	case <-ctx.Done():
		return nil, fmt.Errorf("connect to %s (%s): %w", m.IID, m.Addr, ctx.Err())
	}
}

// runDial dials m, records the outcome in p, and then serves the new
// session for as long as it lives.
func (n *Node) runDial(p *peer, m Member, call *dialCall) {
	s, err := n.dial(m)
	n.mu.Lock()
	p.dial = nil
	switch {
	case err == nil && n.closed:
		s.ys.Close()
		s, err = nil, ErrClosed
	case err == nil:
		p.sessions = append(p.sessions, s)
		p.failures, p.retryAt, p.lastErr = 0, time.Time{}, nil
		if _, open := p.live(); open < n.cfg.SessionsPerPeer {
			// The next of SessionsPerPeer, in the background: streams go
			// on the sessions there are meanwhile.
			next := &dialCall{done: make(chan struct{})}
			p.dial = next
			n.wg.Go(func() { n.runDial(p, m, next) }) // under n.mu and not closed: see spawn
		}
	case n.closed:
		err = fmt.Errorf("%w (%w)", ErrClosed, err)
	default:
		p.failures++
		delay := n.backoff(p.failures)
		p.retryAt, p.lastErr = time.Now().Add(delay), err
		n.log.Warn("dial failed", "peer", m.IID, "addr", m.Addr, "err", err, "failures", p.failures, "retry_in", delay)
	}
	n.mu.Unlock()
	call.s, call.err = s, err
	close(call.done)
	if s != nil {
		s.log.Info("session up", "addr", m.Addr, "dialed", true)
		s.serve()
	}
}

// backoff returns the delay before the next dial after failures in a row:
// exponential from BackoffMin to BackoffMax, with jitter in [d/2, d] so that
// nodes that lost the same peer do not all redial at the same instant.
func (n *Node) backoff(failures int) time.Duration {
	d := n.cfg.BackoffMin
	for i := 1; i < failures && d < n.cfg.BackoffMax; i++ {
		d *= 2
	}
	d = min(d, n.cfg.BackoffMax)
	return d/2 + rand.N(d/2+1)
}

// addSession registers a session the peer dialed. It reports false when
// the node is closed.
func (n *Node) addSession(s *session) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	p := n.peers[s.hello.IID]
	if p == nil {
		p = &peer{}
		n.peers[s.hello.IID] = p
	}
	p.sessions = append(p.sessions, s)
	// The peer just reached us, so it is up: dial it again at once if
	// needed rather than wait out an old backoff.
	p.failures, p.retryAt, p.lastErr = 0, time.Time{}, nil
	return true
}

// removeSession forgets a session that ended.
func (n *Node) removeSession(s *session) {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.peers[s.hello.IID]
	if p == nil {
		return
	}
	for i, x := range p.sessions {
		if x == s {
			p.sessions = append(p.sessions[:i], p.sessions[i+1:]...)
			break
		}
	}
	if len(p.sessions) == 0 && p.dial == nil && p.failures == 0 {
		delete(n.peers, s.hello.IID)
	}
}
