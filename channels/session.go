package channels

import (
	"context"
	"fmt"
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
	log    *slog.Logger

	mu      sync.Mutex
	done    bool
	streams map[*stream]struct{} // outgoing streams not yet finished
}

func (n *Node) newSession(conn net.Conn, h wire.Hello, dialed bool) (*session, error) {
	cfg := n.muxConfig()
	var ys *mux.Session
	var err error
	if dialed {
		ys, err = mux.Client(conn, cfg)
	} else {
		ys, err = mux.Server(conn, cfg)
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
	return &session{
		n:       n,
		ys:      ys,
		hello:   h,
		offers:  offers,
		net:     network,
		log:     n.log.With("peer", h.IID, "net", network, "remote", conn.RemoteAddr().String()),
		streams: make(map[*stream]struct{}),
	}, nil
}

// muxConfig returns the multiplexer settings for a new session.
func (n *Node) muxConfig() mux.Config {
	return mux.Config{
		KeepAliveInterval: n.cfg.KeepAliveInterval,
		MaxStreamWindow:   n.cfg.MaxStreamWindow,
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
		// buffer, so in frames of that size. A frame is written whole, so
		// this bounds how long one stream's data can hold up another's on
		// the session: about 0.5 ms on loopback, 8 ms at 1 Gbit/s, where
		// the session socket's send buffer (megabytes) holds it up longer.
		MaxFrame: 1 << 20,
		Logger:   n.log.With("component", "mux"),
	}
}

// serve accepts the peer's streams until the session ends.
func (s *session) serve() {
	var err error
	for {
		var ys *mux.Stream
		if ys, err = s.ys.AcceptStream(context.Background()); err != nil {
			break
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
	if s.n.ctx.Err() == nil {
		s.log.Info("session closed", "err", err)
	}
}

// handleStream reads an incoming stream's header and queues the stream on
// its channel. Anything wrong resets this stream only.
func (s *session) handleStream(ys *mux.Stream) {
	fail := func(err error) {
		s.log.Warn("rejecting stream", "err", fmt.Errorf("stream %d from %s: %w", ys.ID(), s.hello.IID, err))
		ys.Reset()
	}
	_ = ys.SetReadDeadline(time.Now().Add(s.n.cfg.HandshakeTimeout))
	wh, err := wire.ReadStreamHeader(ys)
	if err != nil {
		fail(err)
		return
	}
	_ = ys.SetReadDeadline(time.Time{})
	if wh.SourceIID != s.hello.IID {
		fail(fmt.Errorf("header names source %q but the session is with %q", wh.SourceIID, s.hello.IID))
		return
	}
	q := s.n.queues[wh.Channel] // read-only after Start
	if q == nil {
		fail(fmt.Errorf("no reply or duplex channel %q on this node", wh.Channel))
		return
	}
	inc := Incoming{
		Stream: newStream(ys, nil),
		Header: Header{Channel: wh.Channel, SourceIID: wh.SourceIID, SourcePort: wh.SourcePort, TargetPort: wh.TargetPort},
		Peer:   s.n.peerMember(s.hello),
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
		fail(fmt.Errorf("channel %q: accept backlog of %d streams stayed full for %v", wh.Channel, cap(q), s.n.cfg.HandshakeTimeout))
	case <-s.ys.CloseChan():
		ys.Reset()
	case <-s.n.ctx.Done():
		ys.Reset()
	}
}

// open opens a stream and writes its header. release is called when the
// stream finishes, only if open returns it.
func (s *session) open(ctx context.Context, h wire.StreamHeader, release func()) (*stream, error) {
	if !s.offers[h.Channel] {
		return nil, fmt.Errorf("peer %s does not serve channel %q", s.hello.IID, h.Channel)
	}
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

// peerMember describes the peer of a session: its membership entry when
// known, else what its handshake said (ports unknown, no address).
func (n *Node) peerMember(h wire.Hello) Member {
	if m, ok := n.member(h.IID); ok {
		return m
	}
	m := Member{IID: h.IID, Role: h.Role, Channels: make(map[string]uint16, len(h.Channels))}
	for _, c := range h.Channels {
		m.Channels[c] = 0
	}
	return m
}
