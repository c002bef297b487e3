package channels

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
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
	if ap, perr := netip.ParseAddrPort(m.Addr); perr == nil && !ap.Addr().Unmap().IsLoopback() && n.plaintextLocalOnly() {
		// Refuse before connecting: nothing would be sent anyway.
		return nil, refused(RefusedPlaintext, fmt.Errorf("dial %s (%s): %w", m.IID, m.Addr, errPlaintext))
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.DialTimeout)
	raw, err := n.cfg.Transport.Dial(ctx, m.Addr)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("dial %s (%s): %w", m.IID, m.Addr, err)
	}
	n.setCongestion(raw)
	if !sameNamespace(raw) && n.plaintextLocalOnly() {
		// A host name that resolved to another host's address.
		raw.Close()
		return nil, refused(RefusedPlaintext, fmt.Errorf("dial %s (%s, at %s): %w", m.IID, m.Addr, raw.RemoteAddr(), errPlaintext))
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
			err = refused(RefusedPeer, fmt.Errorf("%w: %s", errRefused, reply.Reason))
		case reply.Hello.IID != m.IID:
			err = refused(RefusedIdentity, fmt.Errorf("expected instance %q at %s but found %q", m.IID, m.Addr, reply.Hello.IID))
		case m.Role != "" && reply.Hello.Role != m.Role:
			err = refused(RefusedIdentity, fmt.Errorf("expected instance %q at %s to have role %q but it says %q", m.IID, m.Addr, m.Role, reply.Hello.Role))
		}
	}
	if err == nil {
		s, err = n.newSession(conn, reply.Hello, true)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("handshake with %s (%s): %w", m.IID, m.Addr, err)
	}
	s.member, s.auth = m, authDialed
	if n.tls != nil {
		s.auth = authTLS
	}
	return s, nil
}

// errPlaintext explains a plaintext session refused because of where the
// peer is.
var errPlaintext = errors.New("no TLS for a session with a peer outside this network namespace " +
	"(configure TLS, or Insecure where the network is private and encrypted)")

// plaintextAnywhere reports whether the node may hold sessions without
// TLS with peers at any address.
func (n *Node) plaintextAnywhere() bool { return n.cfg.Insecure && n.tls == nil }

// plaintextLocalOnly reports whether the node holds sessions without TLS,
// and only with peers in its network namespace.
func (n *Node) plaintextLocalOnly() bool { return !n.cfg.Insecure && n.tls == nil }

// sameNamespace reports whether c's peer is in this node's network
// namespace: at a loopback address, on the same-host socket, or in this
// process (MemoryTransport).
func sameNamespace(c net.Conn) bool {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap().IsLoopback()
	}
	switch c.LocalAddr().Network() {
	case "unix", "memory":
		return true
	}
	return false
}

// How a session's peer was authenticated (session.auth).
const (
	authTLS      = "tls"       // by its certificate
	authDialed   = "dialed"    // plaintext: this node dialed the member's address
	authAddress  = "address"   // plaintext: it came from the member's address
	authSameHost = "same-host" // plaintext: it came from this network namespace, as the member's address says
)

// serveConn runs the listener's side of the handshake on an accepted
// connection, which acceptLoop counted in n.admission, and then serves the
// session.
func (n *Node) serveConn(raw net.Conn) {
	s := n.acceptSession(raw)
	n.admission.release(raw.RemoteAddr())
	if s != nil {
		s.serve()
	}
}

// acceptSession runs the listener's side of the handshake on raw and
// returns the session registered, or nil.
func (n *Node) acceptSession(raw net.Conn) *session {
	start := time.Now()
	n.setCongestion(raw)
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.HandshakeTimeout)
	conn := raw
	var (
		hello     wire.Hello
		m         Member
		auth      string
		certified *pki.Identity     // the instance the TLS client's certificate names
		stage     = RefusedProtocol // what a failure of the exchange means
	)
	err := guard(ctx, raw, func() error {
		if n.tls != nil {
			stage = RefusedTLS
			tc, id, err := n.tlsAccept(ctx, raw)
			if err != nil {
				return err
			}
			conn, certified, stage = tc, &id, RefusedProtocol
		}
		h, err := wire.ReadHello(conn)
		if err != nil {
			if errors.Is(err, wire.ErrVersion) {
				// Tell the dialer why, so its logs say more than "EOF".
				_ = wire.WriteReply(conn, wire.Reply{Reason: err.Error()})
			}
			return err
		}
		hello = h
		if m, auth, err = n.admit(ctx, raw, certified, h); err != nil {
			_ = wire.WriteReply(conn, wire.Reply{Reason: err.Error()})
			return fmt.Errorf("%w: %w", errRefused, err)
		}
		return wire.WriteReply(conn, wire.Reply{Accepted: true, Hello: n.hello})
	})
	cancel()
	if errors.Is(err, io.EOF) && raw.LocalAddr().Network() == "unix" {
		// A dialer that tried the same-host socket and did not take it
		// (see TCPTransport) closed it without a byte: no handshake was
		// attempted, so none failed.
		conn.Close()
		n.log.Debug("same-host connection closed unused by its dialer")
		return nil
	}
	var s *session
	if err == nil {
		if s, err = n.newSession(conn, hello, false); err == nil {
			s.member, s.auth = m, auth
		}
	}
	n.observeHandshake(hello.IID, false, start, err)
	if err != nil {
		conn.Close()
		if n.ctx.Err() == nil {
			n.refuse(raw.RemoteAddr(), Refusal{Reason: refusalReason(err, stage), Claimed: hello.IID,
				Err: fmt.Errorf("handshake from %s: %w", raw.RemoteAddr(), err)})
		}
		return nil
	}
	if err := n.addSession(s); err != nil {
		s.ys.Close()
		if !errors.Is(err, ErrClosed) {
			n.refuse(raw.RemoteAddr(), Refusal{Reason: refusalReason(err, stage), Claimed: hello.IID, Err: err})
		}
		return nil
	}
	if !n.spawn(s.awaitHeard) {
		s.ys.Close()
		return nil
	}
	if n.sessions.allow(s.hello.IID, true) {
		s.log.Info("session up", "dialed", false, "auth", auth)
	}
	return s
}

// setCongestion gives a session's connection Config.CongestionControl.
// It was checked when the node was made, so a failure means the host
// changed since (a module unloaded): the session keeps the host's
// algorithm, and the node says so once.
func (n *Node) setCongestion(c net.Conn) {
	if err := setCongestion(c, n.cfg.CongestionControl); err != nil {
		n.congestionWarn.Do(func() {
			n.log.Warn("sessions keep the host's congestion control", "err", err)
		})
	}
}

// refusalReason classifies a failed handshake: by the reason it was
// refused with, else as a timeout, else as a failure of stage.
func refusalReason(err error, stage string) string {
	var re *refusalError
	switch {
	case errors.As(err, &re):
		return re.reason
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return RefusedTimeout
	}
	return stage
}

// admit decides whether the peer of raw, which says it is h, may hold a
// session: it must be a current member other than this node, with the
// member's role, and be authenticated as that member: with TLS by its
// certificate, which names certified, else by where its connection comes
// from. It returns the member and how it was authenticated, or a
// refusalError.
func (n *Node) admit(ctx context.Context, raw net.Conn, certified *pki.Identity, h wire.Hello) (Member, string, error) {
	claim := fmt.Sprintf("instance %q (role %q)", h.IID, h.Role)
	if h.IID == n.cfg.IID {
		return Member{}, "", refused(RefusedSelf, fmt.Errorf("instance id %q is the listener's own", h.IID))
	}
	isTLS := certified != nil
	if isTLS {
		// The certificate must name the instance the handshake claims.
		if err := pki.Match(*certified, pki.Identity{IID: h.IID, Role: h.Role}); err != nil {
			return Member{}, "", refused(RefusedIdentity, fmt.Errorf("handshake says %s but %v", claim, err))
		}
	}
	if !isTLS && !sameNamespace(raw) && n.plaintextLocalOnly() {
		return Member{}, "", refused(RefusedPlaintext, fmt.Errorf("%s: %w", claim, errPlaintext))
	}
	m, ok := n.waitMember(ctx, h.IID)
	switch {
	case !ok:
		return Member{}, "", refused(RefusedNotMember, fmt.Errorf("%s is not a member", claim))
	case m.Role != "" && m.Role != h.Role:
		return Member{}, "", refused(RefusedRole, fmt.Errorf("%s: the member's role is %q", claim, m.Role))
	}
	auth := authTLS
	if !isTLS {
		var err error
		if auth, err = n.admitPlaintext(ctx, raw, m); err != nil {
			return Member{}, "", fmt.Errorf("%s: %w", claim, err)
		}
	}
	n.mu.Lock()
	err := n.roomLocked(h.IID)
	n.mu.Unlock()
	if err != nil {
		return Member{}, "", err
	}
	return m, auth, nil
}

// maxAcceptedSessions bounds the sessions one member holds with a node
// that the member dialed, retiring ones included. A node dials at most
// MaxSessionsPerPeer sessions to a peer, and a retired one closes once
// its streams have ended: four times that leaves room for several
// generations of retired sessions still carrying streams. Each session is
// a connection and three goroutines, so a member that dials without end
// would otherwise exhaust them.
const maxAcceptedSessions = 4 * MaxSessionsPerPeer

// roomLocked refuses (RefusedOverload) another session dialed by member
// iid when it holds maxAcceptedSessions already. n.mu must be held.
func (n *Node) roomLocked(iid string) error {
	k := 0
	if p := n.peers[iid]; p != nil {
		for _, s := range p.sessions {
			if !s.info.dialed {
				k++
			}
		}
	}
	if k >= maxAcceptedSessions {
		return refused(RefusedOverload, fmt.Errorf("member %q already holds %d sessions it dialed, the most a member may", iid, k))
	}
	return nil
}

// admitPlaintext decides whether a connection without TLS comes from
// member m: from this network namespace if m's address is here (or m has
// none, or the connection is in this process), else, on an Insecure node,
// from the IP of m's address.
func (n *Node) admitPlaintext(ctx context.Context, raw net.Conn, m Member) (string, error) {
	local := sameNamespace(raw) // else not plaintextLocalOnly: see admit
	if local && raw.LocalAddr().Network() == "memory" {
		// In this process: MemoryTransport addresses are names, not
		// places.
		return authSameHost, nil
	}
	var ips []netip.Addr
	if m.Addr != "" {
		var err error
		if ips, err = memberIPs(ctx, m.Addr); err != nil {
			return "", refused(RefusedAddress, fmt.Errorf("member address: %w", err))
		}
	}
	if local {
		if len(ips) == 0 || slices.ContainsFunc(ips, netip.Addr.IsLoopback) {
			return authSameHost, nil
		}
		return "", refused(RefusedAddress, fmt.Errorf("connection from this host, but the member's address %s is another host's", m.Addr))
	}
	from := raw.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap() // !local: a TCP address
	if slices.Contains(ips, from) {
		return authAddress, nil
	}
	if m.Addr == "" {
		return "", refused(RefusedAddress, fmt.Errorf("connection from %s, but the member has no address to check it against (list it with the address it dials from, or use TLS)", from))
	}
	return "", refused(RefusedAddress, fmt.Errorf("connection from %s, not from the member's address %s", from, m.Addr))
}

// memberIPs returns the IPs of a member's address (host:port), resolving
// a host name.
func memberIPs(ctx context.Context, addr string) ([]netip.Addr, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{ip.Unmap()}, nil
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	for i, ip := range ips {
		ips[i] = ip.Unmap()
	}
	return ips, nil
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
