package mux

import (
	"context"
	"fmt"
	"time"
)

// Ping measures the round-trip time to the peer.
func (s *Session) Ping(ctx context.Context) (time.Duration, error) {
	ch := make(chan struct{})
	s.mu.Lock()
	if s.err != nil {
		err := s.closedErrLocked()
		s.mu.Unlock()
		return 0, fmt.Errorf("mux: ping: %w", err)
	}
	id := s.pingID
	s.pingID++
	if s.pings == nil {
		s.pings = make(map[uint32]chan struct{})
	}
	s.pings[id] = ch
	s.mu.Unlock()

	start := time.Now()
	if err := s.push(frame{header: header{typ: typePing, flags: flagSYN, length: id}}); err != nil {
		return 0, fmt.Errorf("mux: ping: %w", s.closedErr())
	}
	select {
	case <-ch:
		rtt := time.Since(start)
		s.observeRTT(rtt)
		return rtt, nil
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.pings, id)
		s.mu.Unlock()
		return 0, fmt.Errorf("mux: ping: %w", ctx.Err())
	case <-s.done:
		return 0, fmt.Errorf("mux: ping: %w", s.closedErr())
	}
}

// pong completes the ping with the given id.
func (s *Session) pong(id uint32) {
	s.mu.Lock()
	ch := s.pings[id]
	delete(s.pings, id)
	s.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// observeRTT folds a measurement into the smoothed round-trip time.
func (s *Session) observeRTT(rtt time.Duration) {
	for {
		old := s.rtt.Load()
		v := int64(rtt)
		if old != 0 {
			v = (old + v) / 2
		}
		if s.rtt.CompareAndSwap(old, v) {
			return
		}
	}
}

// keepalive pings the peer: every KeepAliveInterval, ending the session if
// within KeepAliveTimeout nothing at all comes back and the peer takes
// nothing of what we send; or, with keepalive off, now and then just to
// measure the round-trip time. The first ping goes at once, for window
// auto-tuning.
//
// A ping may wait behind our own data, in the queue and the connection's
// buffers, for longer than KeepAliveTimeout on a slow link, and the peer
// may have nothing to send: the peer taking our data is then the sign of
// life. A peer that takes nothing stalls our writes, and WriteTimeout
// ends the session if keepalive does not.
func (s *Session) keepalive() {
	defer s.wg.Done()
	interval, enforce := s.cfg.KeepAliveInterval, true
	if interval == 0 {
		interval, enforce = rttInterval, false
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		seenIn, seenOut := s.bytesIn.Load(), s.peerTook()
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.KeepAliveTimeout)
		_, err := s.Ping(ctx)
		cancel()
		if err != nil {
			if s.IsClosed() {
				return
			}
			// The peer taking our ping alone is no sign of life: a host
			// acknowledges it in the kernel, and a peer that reads but
			// does not answer is broken.
			if enforce && s.bytesIn.Load() == seenIn && s.peerTook()-seenOut <= headerSize {
				err := fmt.Errorf("%w: nothing received, and nothing sent taken, within %v of a ping", ErrKeepAliveTimeout, s.cfg.KeepAliveTimeout)
				s.log.Warn("mux: session ends", "remote", s.conn.RemoteAddr().String(), "err", err)
				s.shutdown(err, false, 0)
				return
			}
		}
		t.Reset(interval)
	}
}

// peerTook returns a count that grows as the peer takes what we send: the
// bytes its TCP acknowledged, on a TCP connection (under TLS or not), else
// the bytes written to the connection, which on anything but a socket
// means read by the peer.
func (s *Session) peerTook() uint64 {
	if n, ok := tcpBytesAcked(s.tcp); ok {
		return n
	}
	return s.bytesOut.Load()
}
