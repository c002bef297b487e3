package channels

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// session is one multiplexed connection with another node. Both sides open
// streams on it, whoever dialed.
type session struct {
	n      *Node
	ys     *mux.Session
	hello  wire.Hello      // the peer's handshake
	offers map[string]bool // channels the peer serves
	net    string          // the connection's network: tcp, unix, memory
	info   sessionInfo     // who dialed, when, the certificate's identity
	log    *slog.Logger
	// member is the membership entry the peer was authenticated as, and
	// auth how (authTLS, ...); set before the session is registered.
	member Member
	auth   string

	// heard is closed once the peer is known to read the session: at once
	// for a session this node dialed (the peer's reply came), and for one
	// the peer dialed when the peer answers its first ping (awaitHeard).
	// Until then this node opens no streams on it.
	heard chan struct{}

	// pendingSlots holds a token for each incoming stream being handled:
	// its header being read, or waiting for room in its channel's queue
	// (see maxPendingStreams).
	pendingSlots chan struct{}

	mu      sync.Mutex
	done    bool
	streams map[*stream]struct{} // outgoing streams not yet finished
	// retiring is set once the session takes no new outgoing streams
	// (retire); opening counts the opens in progress, which retire waits
	// for (openDone is signalled when it drops to zero).
	retiring bool
	opening  int
	openDone *sync.Cond
}

func (n *Node) newSession(conn net.Conn, h wire.Hello, dialed bool) (*session, error) {
	cfg := n.muxConfig()
	var ys *mux.Session
	var err error
	sc := sessionConn(conn) // TLS: records batched, see tlsconn.go
	if dialed {
		ys, err = mux.Client(sc, cfg)
	} else {
		ys, err = mux.Server(sc, cfg)
	}
	if err != nil {
		return nil, fmt.Errorf("start session: %w", err)
	}
	offers := make(map[string]bool, len(h.Channels))
	for _, c := range h.Channels {
		offers[c] = true
	}
	// net says whether the session took the same-host Unix socket.
	network := conn.LocalAddr().Network()
	s := &session{
		n:       n,
		ys:      ys,
		hello:   h,
		offers:  offers,
		net:     network,
		info:    newSessionInfo(conn, dialed),
		log:     n.log.With("peer", h.IID, "net", network, "remote", conn.RemoteAddr().String()),
		streams: make(map[*stream]struct{}),

		pendingSlots: make(chan struct{}, maxPendingStreams),
		heard:        make(chan struct{}),
	}
	if dialed {
		close(s.heard)
	}
	s.openDone = sync.NewCond(&s.mu)
	return s, nil
}

func (s *session) isHeard() bool {
	select {
	case <-s.heard:
		return true
	default:
		return false
	}
}

// awaitHeard pings the peer that dialed s, once: the answer shows that the
// peer read this node's handshake reply and reads the session. Streams
// opened on s before that are lost if the reply comes too late for the
// peer, which then gives up its handshake and closes the connection: on a
// congested link, a reply 5s late reset every stream opened on it.
func (s *session) awaitHeard() {
	if _, err := s.ys.Ping(s.n.ctx); err != nil {
		return // the session or the node ended first
	}
	close(s.heard)
	s.n.mu.Lock()
	s.n.sessionsChangedLocked()
	s.n.mu.Unlock()
}

// muxConfig returns the multiplexer settings for a new session.
func (n *Node) muxConfig() mux.Config {
	return mux.Config{
		KeepAliveInterval: n.cfg.KeepAliveInterval,
		MaxStreamWindow:   n.cfg.MaxStreamWindow,
		// Twice what a tcpproxy peer can send before its streams are
		// taken by a channel: MaxPendingOpens (256) streams waiting to be
		// accepted and maxPendingStreams being handled, 256 KiB each.
		MaxBuffered: n.cfg.MaxSessionBuffered,
		// Every proxied TCP connection is a stream.
		MaxIncomingStreams: 1 << 16,
		// Our accept loop hands streams off at once, so the session's own
		// backlog only absorbs bursts; the per-channel AcceptBacklog is the
		// real limit.
		AcceptBacklog: 1024,
		// Spliced bulk data goes in frames of up to a pipe's 1 MiB: on
		// loopback, 1 MiB frames cost 20% less CPU per byte than 256 KiB
		// ones with 1 connection and 10% less with 8, and move 13-23%
		// more (scripts/bench, 2026-11-26). Copied data (TLS, memory and
		// tun networks) comes in Writes of at most the proxy's 256 KiB
		// buffer, so in frames of that size. A small message, FIN or
		// window update of another stream goes out with the writer's next
		// batch, ahead of large frames still queued, but waits for the
		// batch being written (at least one whole frame: about 0.5 ms on
		// loopback, 8 ms at 1 Gbit/s) and for what the session socket's
		// send buffer holds (megabytes, so longer on a slow link).
		MaxFrame: 1 << 20,
		Logger:   n.log.With("component", "mux"),
	}
}

// serve accepts the peer's streams until the session ends.
func (s *session) serve() {
	if s.n.cfg.MaxSessionAge > 0 {
		s.n.spawn(s.ageOut)
	}
	var err error
	for {
		var ys *mux.Stream
		if ys, err = s.ys.AcceptStream(context.Background()); err != nil {
			break
		}
		select {
		case s.pendingSlots <- struct{}{}:
		case <-s.ys.CloseChan():
			ys.Reset()
			continue // AcceptStream fails next
		}
		if !s.n.spawn(func() { s.handleStream(ys) }) {
			ys.Reset()
			break
		}
	}
	s.ys.Close()
	s.n.removeSession(s)
	s.mu.Lock()
	s.done = true
	streams := s.streams
	s.streams = nil
	s.mu.Unlock()
	// Streams idle in the application see the end on their next Read or
	// Write; release them now so balancer counts drop at once.
	for st := range streams {
		st.finish()
	}
	if s.n.ctx.Err() == nil && s.n.sessions.allow(s.hello.IID, false) {
		s.log.Info("session closed", "err", err)
	}
}

// maxPendingStreams bounds the incoming streams of a session being handled,
// each a goroutine for up to Config.HandshakeTimeout to read the stream's
// header and as long again to wait for room in its channel's accept
// queue: while that many wait, serve takes no more from the multiplexer,
// whose accept backlog then holds them, and the peer's opens wait for it
// to accept them (mux.Config.MaxPendingOpens). A peer that runs this
// package sends the header in a stream's first frame, so its streams wait
// only to be scheduled and for their channel's consumer; one that sends
// headers slowly, or never, holds up only its own session.
const maxPendingStreams = 256

// handleStream reads an incoming stream's header and queues the stream on
// its channel. Anything wrong resets this stream only.
func (s *session) handleStream(ys *mux.Stream) {
	var wh wire.StreamHeader
	fail := func(reason string, err error) {
		s.n.refuse(s.ys.RemoteAddr(), Refusal{Stream: true, Reason: reason, Claimed: s.hello.IID,
			Err: fmt.Errorf("stream %d from %s (channel %q): %w", ys.ID(), s.hello.IID, wh.Channel, err)})
		ys.Reset()
	}
	// The stream's place among the pending ones is released once it is
	// queued or refused.
	pending := true
	release := func() {
		if pending {
			pending = false
			<-s.pendingSlots
		}
	}
	defer release()
	_ = ys.SetReadDeadline(time.Now().Add(s.n.cfg.HandshakeTimeout))
	wh, err := wire.ReadStreamHeader(ys)
	if err != nil {
		fail(refusalReason(err, RefusedProtocol), err)
		return
	}
	_ = ys.SetReadDeadline(time.Time{})
	if wh.SourceIID != s.hello.IID {
		fail(RefusedSource, fmt.Errorf("header names source %q but the session is with %q", wh.SourceIID, s.hello.IID))
		return
	}
	if wh.Channel == retireChannel {
		release() // the retirement outlives the stream
		s.retiredByPeer(ys)
		return
	}
	q := s.n.queues[wh.Channel] // read-only after Start
	if q == nil {
		fail(RefusedChannel, fmt.Errorf("no reply or duplex channel %q on this node", wh.Channel))
		return
	}
	peer, err := s.n.mayUse(s, wh.Channel)
	if err != nil {
		fail(RefusedForbidden, err)
		return
	}
	inc := Incoming{
		Stream: newStream(ys, nil),
		Header: Header{Channel: wh.Channel, SourceIID: wh.SourceIID, SourcePort: wh.SourcePort, TargetPort: wh.TargetPort},
		Peer:   peer,
	}
	select {
	case q <- inc:
		return
	default:
	}
	// The queue is full: a burst (a connection pool warming up) outran the
	// channel's consumer. The stream waits for room, as a connection waits
	// in a listen backlog, rather than being reset while it is merely
	// early; its opener's data waits within the stream's window. A consumer
	// that takes nothing for HandshakeTimeout is stuck or gone: the stream
	// is reset then.
	wait := time.NewTimer(s.n.cfg.HandshakeTimeout)
	defer wait.Stop()
	select {
	case q <- inc:
	case <-wait.C:
		fail(RefusedBacklog, fmt.Errorf("channel %q: accept backlog of %d streams stayed full for %v", wh.Channel, cap(q), s.n.cfg.HandshakeTimeout))
	case <-s.ys.CloseChan():
		ys.Reset()
	case <-s.n.ctx.Done():
		ys.Reset()
	}
}

// mayUse decides whether the peer of s may open a stream on channel name,
// one this node serves, and returns its membership entry. Any current
// member may open streams on a reply channel: membership does not say who
// requests what, so the mesh's membership is the boundary. A duplex
// channel takes streams only from the members of its group, which have
// the channel too (their handshake lists it).
func (n *Node) mayUse(s *session, name string) (Member, error) {
	m, ok := n.member(s.hello.IID)
	if !ok {
		return Member{}, fmt.Errorf("%q is no longer a member", s.hello.IID)
	}
	if n.isDuplex(name) && !s.offers[name] {
		return Member{}, fmt.Errorf("%q is not in the group of duplex channel %q (its handshake does not list it)", s.hello.IID, name)
	}
	return m, nil
}

// isDuplex reports whether name is a duplex channel of this node.
func (n *Node) isDuplex(name string) bool {
	for _, d := range n.duplexes { // read-only after Start
		if d.name == name {
			return true
		}
	}
	return false
}

// open opens a stream and writes its header. release is called when the
// stream finishes, only if open returns it.
func (s *session) open(ctx context.Context, h wire.StreamHeader, release func()) (*stream, error) {
	if !s.offers[h.Channel] {
		return nil, fmt.Errorf("peer %s does not serve channel %q", s.hello.IID, h.Channel)
	}
	if !s.beginOpen() {
		return nil, errRetiring
	}
	defer s.endOpen()
	ys, err := s.ys.OpenStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("open stream to %s: %w", s.hello.IID, err)
	}
	st := newStream(ys, nil)
	st.release = func() {
		s.untrack(st)
		if release != nil {
			release()
		}
	}
	if !s.track(st) {
		ys.Reset()
		return nil, fmt.Errorf("open stream to %s: %w", s.hello.IID, mux.ErrSessionClosed)
	}
	if err := wire.WriteStreamHeader(ys, h); err != nil {
		s.untrack(st)
		ys.Reset()
		return nil, fmt.Errorf("open stream to %s: %w", s.hello.IID, err)
	}
	return st, nil
}

func (s *session) track(st *stream) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return false
	}
	s.streams[st] = struct{}{}
	return true
}

func (s *session) untrack(st *stream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.streams, st)
}

// Retiring a session (Config.MaxSessionAge) without cutting a stream: the
// node that retires it stops opening streams on it, asks the peer to do
// the same, and closes it once it carries no stream. The request is a
// stream on retireChannel, a name no channel can have; the peer answers
// by closing its side of that stream once it stopped opening streams on
// the session. Stream opens go out in order on a session, so when the
// answer arrives every stream either side will ever open on the session
// is known to both, and a session with none left can close.

// retireChannel is the stream header channel of a retirement request.
const retireChannel = "\x00retire"

// errRetiring is returned by open on a retiring session; openTo then
// looks for another.
var errRetiring = errors.New("session retiring")

// beginOpen counts an open in progress, unless the session is retiring or
// done.
func (s *session) beginOpen() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.retiring || s.done {
		return false
	}
	s.opening++
	return true
}

func (s *session) endOpen() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.opening--; s.opening == 0 {
		s.openDone.Broadcast()
	}
}

// isRetiring reports whether the session takes no new outgoing streams.
func (s *session) isRetiring() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retiring
}

// stopOpening marks the session retiring and waits for the opens in
// progress, whose stream openings are then queued on the session. It
// reports false if the session was retiring already.
func (s *session) stopOpening() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.retiring {
		return false
	}
	s.retiring = true
	for s.opening > 0 {
		s.openDone.Wait()
	}
	return true
}

// ageOut retires the session when it reaches Config.MaxSessionAge.
func (s *session) ageOut() {
	t := time.NewTimer(time.Until(s.info.established.Add(s.n.cfg.MaxSessionAge)))
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.ys.CloseChan():
		return
	}
	if !s.stopOpening() {
		return
	}
	s.log.Info("session retiring", "age", time.Since(s.info.established).Round(time.Millisecond), "max_age", s.n.cfg.MaxSessionAge)
	s.n.replace(s)
	if err := s.askPeerToRetire(); err != nil && !s.ys.IsClosed() {
		// The session closes all the same once it has no stream left;
		// a stream the peer opens at that instant would be reset.
		s.log.Warn("peer did not confirm the session's retirement", "err", err)
	}
	s.closeWhenIdle()
}

// askPeerToRetire sends the retirement request and waits for the answer.
func (s *session) askPeerToRetire() error {
	ctx, cancel := context.WithTimeout(s.n.ctx, s.n.cfg.HandshakeTimeout)
	defer cancel()
	ys, err := s.ys.OpenStream(ctx)
	if err != nil {
		return err
	}
	defer ys.Close()
	_ = ys.SetDeadline(time.Now().Add(s.n.cfg.HandshakeTimeout))
	stop := context.AfterFunc(s.n.ctx, func() { ys.Reset() })
	defer stop()
	if err := wire.WriteStreamHeader(ys, wire.StreamHeader{Channel: retireChannel, SourceIID: s.n.cfg.IID}); err != nil {
		return err
	}
	if err := ys.CloseWrite(); err != nil {
		return err
	}
	if _, err := ys.Read(make([]byte, 1)); err != io.EOF {
		return fmt.Errorf("retirement answer: %w", err)
	}
	return nil
}

// retiredByPeer answers the peer's retirement request on ys: once this
// node opens no more streams on the session, it closes its side of ys.
// Then it closes the session once idle, as the peer does: a peer that
// asked and kept the session open would otherwise hold it for ever. It
// does not dial a replacement (the next stream to the peer dials one if
// need be), so that a peer retiring every session at once does not make
// this node dial it again and again.
func (s *session) retiredByPeer(ys *mux.Stream) {
	// Not first: retiring already, and closed once idle by whoever
	// started it (this node's ageOut, or an earlier request).
	first := s.stopOpening()
	if first && s.n.sessions.allow(s.hello.IID, false) {
		s.log.Info("session retired by the peer", "age", time.Since(s.info.established).Round(time.Millisecond))
	}
	_ = ys.SetDeadline(time.Now().Add(s.n.cfg.HandshakeTimeout))
	if _, err := ys.Read(make([]byte, 1)); err != io.EOF { // the request's end
		ys.Reset()
	} else {
		_ = ys.CloseWrite()
		ys.Close()
	}
	if first {
		s.closeWhenIdle()
	}
}

// closeWhenIdle closes the session once no stream is open on it, either
// way, checking at growing intervals up to a second.
func (s *session) closeWhenIdle() {
	wait := 5 * time.Millisecond
	t := time.NewTimer(wait)
	defer t.Stop()
	for s.ys.NumStreams() > 0 {
		select {
		case <-t.C:
		case <-s.ys.CloseChan():
			return
		case <-s.n.ctx.Done():
			return
		}
		wait = min(2*wait, time.Second)
		t.Reset(wait)
	}
	s.log.Info("retired session closed: no stream left", "age", time.Since(s.info.established).Round(time.Millisecond))
	s.ys.Close()
}
