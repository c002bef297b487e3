package channels

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// ErrBackoff is matched (errors.Is) by the error of an Open to a peer whose
// last dials failed and whose next attempt is not due yet. The peer is not
// waited for while other members can be tried: a RequestChannel moves on.
// When none can, the Open waits for the next attempt if the last dial
// failed in passing and the attempt is due before the Open's deadline,
// and fails at once otherwise.
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
	// retryAt is when the peer may be dialed again after a transient
	// failure, zero otherwise; set with err.
	retryAt time.Time
	// more is how many more sessions to dial, one after the other, once
	// this one is up, as long as fewer than SessionsPerPeer are open.
	// It is counted down rather than open sessions counted up alone, so
	// that a peer that retires sessions as they come cannot keep this
	// node dialing.
	more int
}

// stallAvoid is how long a session may carry nothing (mux.Session.Stalled:
// a write waits without progress, or TCP retransmits and hears nothing)
// before new streams avoid it: its link carries nothing for now (an
// outage, TCP backing off after losses), and the write timeout may yet end
// it, so a connection opened now would wait behind the stall or be reset
// with it. A working slow link makes progress many times a second.
const stallAvoid = 2 * time.Second

// live returns the open, not retiring, not stalled session carrying the
// fewest streams (the newest of those tied); the open, not retiring
// session stalled the least, if any is; and how many open, not retiring
// sessions there are, stalled or not. Sessions the peer dialed count as
// open but carry no new streams until the peer has answered on them
// (session.heard).
func (p *peer) live() (best, stalled *session, open int) {
	least, leastStall := 0, time.Duration(0)
	for i := len(p.sessions) - 1; i >= 0; i-- {
		s := p.sessions[i]
		if s.ys.IsClosed() || s.isRetiring() {
			continue
		}
		open++
		if !s.isHeard() {
			continue
		}
		if w := s.ys.Stalled(); w >= stallAvoid {
			if stalled == nil || w < leastStall {
				stalled, leastStall = s, w
			}
			continue
		}
		if n := s.ys.NumStreams(); best == nil || n < least {
			best, least = s, n
		}
	}
	return best, stalled, open
}

// answerDue returns when the last of the open sessions the peer dialed
// and has not answered on yet must have been answered, if that is still to
// come: the dialer gives up its handshake by then (HandshakeTimeout). The
// zero time if there is none.
func (p *peer) answerDue(timeout time.Duration) time.Time {
	var due time.Time
	for _, s := range p.sessions {
		if s.ys.IsClosed() || s.isHeard() {
			continue
		}
		if t := s.info.established.Add(timeout); t.After(due) && time.Until(t) > 0 {
			due = t
		}
	}
	return due
}

// openTo opens a stream to member m. release is called once the stream has
// finished, only when openTo returned it. lastResort says that the caller
// has no other member to try: then a stalled session is better than none
// (see sessionTo).
func (n *Node) openTo(ctx context.Context, m Member, h Header, lastResort bool, release func()) (Stream, error) {
	wh := wire.StreamHeader{Channel: h.Channel, SourceIID: h.SourceIID, SourcePort: h.SourcePort, TargetPort: h.TargetPort}
	var err error
	// A session can die or start retiring between the lookup and the
	// open; then the next round finds another or dials a fresh one. Three
	// rounds suffice: a session that dies right after its own dial means
	// the peer is going away.
	for range 3 {
		var s *session
		if s, err = n.sessionTo(ctx, m, lastResort); err != nil {
			return nil, err
		}
		var st *stream
		if st, err = s.open(ctx, wh, release); err == nil {
			return st, nil
		}
		if !s.ys.IsClosed() && !errors.Is(err, errRetiring) {
			return nil, err
		}
	}
	return nil, err
}

// sessionTo returns a live session with m, dialing one if there is none.
// Sessions that are stalled (stallAvoid) count as none: a dial gets a
// new one beside them. If that cannot be had (the dial fails, the peer's
// dials are backing off, or enough sessions were dialed around stalls
// already), the caller gets the stalled session if it is its last resort,
// and an error otherwise, to try another member. The error of a dial that
// failed in passing (transient), or of the backoff after one, says when
// the peer may be dialed again (retryAt), for openRetrying.
func (n *Node) sessionTo(ctx context.Context, m Member, lastResort bool) (*session, error) {
	for {
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
		s, stalled, open := p.live()
		switch {
		case s != nil:
			n.mu.Unlock()
			return s, nil
		case stalled != nil && open >= min(2*n.cfg.SessionsPerPeer, MaxSessionsPerPeer):
			// Enough sessions dialed around stalls already.
			n.mu.Unlock()
			return stalledOr(stalled, lastResort, m, fmt.Errorf("%d sessions are open to %s (%s), the most while some are stalled", open, m.IID, m.Addr))
		}
		call := p.dial
		if call == nil && stalled == nil {
			if due := p.answerDue(n.cfg.HandshakeTimeout); !due.IsZero() {
				// The peer dialed a session that it has not answered on
				// yet: it will, within a round trip, unless its handshake
				// is timing out. Wait for that (sessionsChanged) rather
				// than dial one more.
				n.mu.Unlock()
				return nil, &retryable{at: due, soon: true, err: fmt.Errorf("peer %s (%s) dialed a session and has not answered on it yet", m.IID, m.Addr)}
			}
		}
		if call == nil {
			if wait := time.Until(p.retryAt); wait > 0 {
				// p's fields belong to n.mu: read them before unlocking.
				err := fmt.Errorf("peer %s (%s): %w after %d failed dials, next attempt in %v: %w",
					m.IID, m.Addr, ErrBackoff, p.failures, wait.Round(time.Millisecond), p.lastErr)
				if transient(p.lastErr) {
					err = &retryable{at: p.retryAt, err: err}
				}
				n.mu.Unlock()
				if stalled != nil {
					return stalledOr(stalled, lastResort, m, err)
				}
				return nil, err
			}
			// The dial belongs to the node, not to this caller: a caller
			// that gives up must not fail the dial for the others waiting
			// on it.
			more := n.cfg.SessionsPerPeer - 1
			if stalled != nil {
				more = 0 // one beside the stalled ones
			}
			call = &dialCall{done: make(chan struct{}), more: more}
			p.dial = call
			n.wg.Go(func() { n.runDial(p, m, call) }) // under n.mu and not closed: see spawn
		}
		changed := n.sessionsChanged
		n.mu.Unlock()
		select {
		case <-call.done:
			if call.err != nil && stalled != nil {
				return stalledOr(stalled, lastResort, m, call.err)
			}
			if !call.retryAt.IsZero() {
				return nil, &retryable{at: call.retryAt, err: call.err}
			}
			return call.s, call.err
		case <-changed:
			// A session came up (the peer dialed in) while the dial is
			// under way, or one ended: look again.
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to %s (%s): %w", m.IID, m.Addr, ctx.Err())
		}
	}
}

// transient reports whether a dial failed in a way that may pass by
// itself: nothing listened, the connection was lost, the network or the
// name was not there, or the handshake timed out (a peer restarting,
// overloaded, or behind a congested link). A refusal, or a TLS handshake
// that failed verification, is an answer that dialing again would only
// repeat.
func transient(err error) bool {
	var re *refusalError
	if err == nil || errors.As(err, &re) {
		return false
	}
	var ne net.Error
	var dns *net.DNSError
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) ||
		errors.Is(err, syscall.EHOSTDOWN) || errors.Is(err, syscall.ENETDOWN) ||
		errors.Is(err, syscall.EADDRNOTAVAIL) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout()) ||
		(errors.As(err, &dns) && (dns.IsNotFound || dns.IsTemporary || dns.IsTimeout))
}

// retryable is the error of an open whose dial failed in passing
// (transient), with when the peer may be dialed again; or of an open that
// found only a session the peer dialed and has not answered on yet, with
// when the answer is due at the latest (soon: it should come within a
// round trip, and wakes the waiting Opens).
type retryable struct {
	at   time.Time
	soon bool
	err  error
}

func (e *retryable) Error() string { return e.err.Error() }
func (e *retryable) Unwrap() error { return e.err }

// retryAt returns when the open that failed with err may be tried again,
// and the zero time if trying again would fail the same way; soon says
// that something expected sooner (a peer's answer) may let it succeed.
func retryAt(err error) (at time.Time, soon bool) {
	var r *retryable
	if errors.As(err, &r) {
		return r.at, r.soon
	}
	return time.Time{}, false
}

// openRetrying runs open, the caller's last resort, and runs it again
// while it fails in passing: when the failed dial's backoff ends, or
// sooner if a session comes up or ends or the membership changes. As a
// TCP connect sends its SYN again, this goes on until ctx's deadline, or
// Config.DialTimeout from now if ctx has none, and stops at once when the
// next try would come after it, unless an answer the peer owes may come
// sooner.
func (n *Node) openRetrying(ctx context.Context, open func() error) error {
	giveUp, ok := ctx.Deadline()
	if !ok {
		giveUp = time.Now().Add(n.cfg.DialTimeout)
	}
	for {
		// Taken before open looks, so that a change after it looks
		// wakes the wait below.
		n.mu.Lock()
		sessions, members := n.sessionsChanged, n.members.changed
		n.mu.Unlock()
		err := open()
		at, soon := retryAt(err)
		if err == nil || at.IsZero() || at.After(giveUp) && !soon {
			return err
		}
		if at.After(giveUp) {
			at = giveUp
		}
		werr := n.waitRetry(ctx, at, sessions, members)
		if werr == nil && !time.Now().Before(giveUp) {
			werr = context.DeadlineExceeded
		}
		if werr != nil {
			return fmt.Errorf("%w, while waiting to dial again after: %w", werr, err)
		}
	}
}

// waitRetry waits until at, or until sessions or members is closed (a
// session came up or ended, the membership changed), whichever is first;
// it fails when ctx ends or the node closes.
func (n *Node) waitRetry(ctx context.Context, at time.Time, sessions, members <-chan struct{}) error {
	t := time.NewTimer(time.Until(at))
	defer t.Stop()
	select {
	case <-t.C:
	case <-sessions:
	case <-members:
	case <-ctx.Done():
		return ctx.Err()
	case <-n.ctx.Done():
		return ErrClosed
	}
	return nil
}

// sessionsChangedLocked wakes the Opens waiting for a session (waitRetry,
// sessionTo): one came up, or ended.
func (n *Node) sessionsChangedLocked() {
	close(n.sessionsChanged)
	n.sessionsChanged = make(chan struct{})
}

// errStalled is matched by the error of an open that found every session
// to the member stalled, no other to be had, and was not the caller's last
// resort: the caller may try other members first and come back with
// lastResort set.
var errStalled = errors.New("every session to the member is stalled")

// stalledOr returns the stalled session s to a caller for whom it is the
// last resort (it may yet recover), and to others the reason no other
// session could be had.
func stalledOr(s *session, lastResort bool, m Member, why error) (*session, error) {
	if lastResort && !s.ys.IsClosed() {
		return s, nil
	}
	return nil, fmt.Errorf("%w (%s at %s): their writes have waited %v or more without progress, and no other session could be had: %w",
		errStalled, m.IID, m.Addr, stallAvoid, why)
}

// runDial dials m, records the outcome in p, and then serves the new
// session for as long as it lives.
func (n *Node) runDial(p *peer, m Member, call *dialCall) {
	s, err := n.dial(m)
	var re *refusalError
	if errors.As(err, &re) && n.cfg.OnRefused != nil {
		n.cfg.OnRefused(Refusal{Dialed: true, Reason: re.reason, Remote: m.Addr, Claimed: m.IID, Err: err})
	}
	n.mu.Lock()
	p.dial = nil
	cur, ok := n.members.byIID[m.IID]
	var discard *session
	switch {
	case err == nil && n.closed:
		discard, s, err = s, nil, ErrClosed
	case err == nil && (!ok || !sameIdentity(cur, m, s.auth)):
		// The membership changed while we dialed: no fault of the peer's.
		discard, s, err = s, nil, fmt.Errorf("dial %s (%s): the member changed or left meanwhile", m.IID, m.Addr)
	case err == nil:
		p.sessions = append(p.sessions, s)
		p.failures, p.retryAt, p.lastErr = 0, time.Time{}, nil
		n.sessionsChangedLocked()
		if _, _, open := p.live(); open < n.cfg.SessionsPerPeer && call.more > 0 {
			// The next of SessionsPerPeer, in the background: streams go
			// on the sessions there are meanwhile.
			next := &dialCall{done: make(chan struct{}), more: call.more - 1}
			p.dial = next
			n.wg.Go(func() { n.runDial(p, m, next) }) // under n.mu and not closed: see spawn
		}
	case n.closed:
		err = fmt.Errorf("%w (%w)", ErrClosed, err)
	default:
		p.failures++
		delay := n.backoff(p.failures)
		p.retryAt, p.lastErr = time.Now().Add(delay), err
		if transient(err) {
			call.retryAt = p.retryAt
		}
		n.log.Warn("dial failed", "peer", m.IID, "addr", m.Addr, "err", err, "failures", p.failures, "retry_in", delay)
	}
	n.mu.Unlock()
	if discard != nil {
		discard.ys.Close()
	}
	call.s, call.err = s, err
	close(call.done)
	if s != nil {
		if n.sessions.allow(m.IID, true) {
			s.log.Info("session up", "addr", m.Addr, "dialed", true, "auth", s.auth)
		}
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

// addSession registers a session the peer dialed, after checking that
// the member it was admitted as has not changed since. It fails with
// ErrClosed when the node is closed.
func (n *Node) addSession(s *session) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	iid := s.hello.IID
	if cur, ok := n.members.byIID[iid]; !ok || !sameIdentity(cur, s.member, s.auth) {
		return refused(RefusedNotMember, fmt.Errorf("%w: member %q changed or left during the handshake", errRefused, iid))
	}
	if err := n.roomLocked(iid); err != nil {
		return err
	}
	p := n.peers[iid]
	if p == nil {
		p = &peer{}
		n.peers[iid] = p
	}
	p.sessions = append(p.sessions, s)
	// The peer just reached us, so it is up: dial it again at once if
	// needed rather than wait out an old backoff.
	p.failures, p.retryAt, p.lastErr = 0, time.Time{}, nil
	return nil
}

// sameIdentity reports whether a session authenticated (by auth) as
// member was still authenticated as cur, the member's entry now: the
// role must be the same and, without TLS, where the peer was authenticated
// by its address, the address too.
func sameIdentity(cur, member Member, auth string) bool {
	return cur.Role == member.Role && (auth == authTLS || cur.Addr == member.Addr)
}

// replace dials a session to stand in for s, which is retiring, if s was
// dialed by this node and the peer is still a member: the peer then keeps
// its SessionsPerPeer sessions.
func (n *Node) replace(s *session) {
	if !s.info.dialed {
		return // the peer dialed it, and replaces it if it needs to
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	m, ok := n.members.byIID[s.hello.IID]
	p := n.peers[s.hello.IID]
	if n.closed || !ok || p == nil || p.dial != nil {
		return
	}
	_, _, open := p.live()
	if open >= n.cfg.SessionsPerPeer {
		return
	}
	call := &dialCall{done: make(chan struct{}), more: n.cfg.SessionsPerPeer - open - 1}
	p.dial = call
	n.wg.Go(func() { n.runDial(p, m, call) }) // under n.mu and not closed: see spawn
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
			n.ended = addLimits(n.ended, s.ys.LimitStats())
			n.sessionsChangedLocked()
			break
		}
	}
	if len(p.sessions) == 0 && p.dial == nil && p.failures == 0 {
		delete(n.peers, s.hello.IID)
	}
}
