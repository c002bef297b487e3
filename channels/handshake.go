package channels

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/pki"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// errRefused is matched by the error of a handshake the listener refused.
var errRefused = errors.New("session refused")

// dial connects to m and runs the dialer's side of the handshake.
func (n *Node) dial(m Member) (s *session, err error) {
	start := time.Now()
	defer func() { n.observeHandshake(m.IID, true, start, err) }()
	if m.Addr == "" {
		return nil, fmt.Errorf("dial %s: member has no address", m.IID)
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.DialTimeout)
	raw, err := n.cfg.Transport.Dial(ctx, m.Addr)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("dial %s (%s): %w", m.IID, m.Addr, err)
	}
	ctx, cancel = context.WithTimeout(n.ctx, n.cfg.HandshakeTimeout)
	defer cancel()
	conn := raw
	var reply wire.Reply
	err = guard(ctx, raw, func() error {
		if n.tls != nil {
			tc, err := n.tlsDial(ctx, raw, m)
			if err != nil {
				return err
			}
			conn = tc
		}
		if err := wire.WriteHello(conn, n.hello); err != nil {
			return err
		}
		var err error
		reply, err = wire.ReadReply(conn)
		return err
	})
	if err == nil {
		switch {
		case !reply.Accepted:
			err = fmt.Errorf("%w: %s", errRefused, reply.Reason)
		case reply.Hello.IID != m.IID:
			err = fmt.Errorf("expected instance %q at %s but found %q", m.IID, m.Addr, reply.Hello.IID)
		}
	}
	if err == nil {
		s, err = n.newSession(conn, reply.Hello, true)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("handshake with %s (%s): %w", m.IID, m.Addr, err)
	}
	return s, nil
}

// serveConn runs the listener's side of the handshake on an accepted
// connection and then serves the session.
func (n *Node) serveConn(raw net.Conn) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.HandshakeTimeout)
	conn := raw
	var hello wire.Hello
	err := guard(ctx, raw, func() error {
		var certified *pki.Identity // the instance the TLS client's certificate names
		if n.tls != nil {
			tc, id, err := n.tlsAccept(ctx, raw)
			if err != nil {
				return err
			}
			conn, certified = tc, &id
		}
		h, err := wire.ReadHello(conn)
		if err != nil {
			if errors.Is(err, wire.ErrVersion) {
				// Tell the dialer why, so its logs say more than "EOF".
				_ = wire.WriteReply(conn, wire.Reply{Reason: err.Error()})
			}
			return err
		}
		if h.IID == n.cfg.IID {
			reason := fmt.Sprintf("instance id %q is the listener's own", h.IID)
			_ = wire.WriteReply(conn, wire.Reply{Reason: reason})
			return fmt.Errorf("%w: %s", errRefused, reason)
		}
		if certified != nil {
			// The certificate must name the instance the handshake claims.
			if err := pki.Match(*certified, pki.Identity{IID: h.IID, Role: h.Role}); err != nil {
				reason := fmt.Sprintf("handshake says instance %q (role %q) but %v", h.IID, h.Role, err)
				_ = wire.WriteReply(conn, wire.Reply{Reason: reason})
				return fmt.Errorf("%w: %s", errRefused, reason)
			}
		}
		hello = h
		return wire.WriteReply(conn, wire.Reply{Accepted: true, Hello: n.hello})
	})
	cancel()
	if errors.Is(err, io.EOF) && raw.LocalAddr().Network() == "unix" {
		// A dialer that tried the same-host socket and did not take it
		// (see TCPTransport) closed it without a byte: no handshake was
		// attempted, so none failed.
		conn.Close()
		n.log.Debug("same-host connection closed unused by its dialer")
		return
	}
	var s *session
	if err == nil {
		s, err = n.newSession(conn, hello, false)
	}
	n.observeHandshake(hello.IID, false, start, err)
	if err != nil {
		conn.Close()
		if n.ctx.Err() == nil {
			n.log.Warn("incoming session failed", "err", fmt.Errorf("handshake from %s: %w", raw.RemoteAddr(), err))
		}
		return
	}
	if !n.addSession(s) {
		s.ys.Close()
		return
	}
	s.log.Info("session up", "dialed", false)
	s.serve()
}

func (n *Node) observeHandshake(peer string, dialed bool, start time.Time, err error) {
	if n.cfg.OnHandshake != nil {
		n.cfg.OnHandshake(peer, dialed, time.Since(start), err)
	}
}

// guard runs f, an exchange on conn, within ctx: conn's deadline follows
// ctx's, and ctx ending (node closing) interrupts f at once.
func guard(ctx context.Context, conn net.Conn, f func() error) error {
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	err := f()
	if !stop() {
		// ctx ended, and the deadline may have cut f short: say so.
		if err == nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	_ = conn.SetDeadline(time.Time{})
	return err
}
