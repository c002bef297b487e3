package channels

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
)

// Transport carries the connections sessions run over.
type Transport interface {
	// Listen listens on addr (host:port; port 0 picks one).
	Listen(addr string) (net.Listener, error)
	// Dial connects to addr, giving up when ctx ends.
	Dial(ctx context.Context, addr string) (net.Conn, error)
}

// TCPTransport returns the production Transport: TCP, with a shortcut for
// peers on the same host. A listener on a loopback or unspecified address
// also listens on a Unix domain socket in the abstract namespace named
// after its loopback address and port, and a dial to a loopback address
// tries that socket first, falling back to TCP when nobody listens there.
// Abstract names belong to the network namespace, as 127.0.0.0/8 does, so
// the socket found is the one behind the TCP port. A Unix socket carries
// the same bytes (and splices) at a fraction of a loopback TCP
// connection's kernel work: no segments, acknowledgements or congestion
// control. The dialer takes the socket only when its owner runs as the
// dialer's user or as root, so another user cannot squat the name, and
// when it can give the socket a send buffer of sameHostMinSendBuffer; TLS,
// when configured, authenticates the peer over either. A Node gives the
// transport its logger, which then warns when a socket found is not taken
// or a listener's name is taken. The shortcut exists on Linux only.
func TCPTransport() Transport { return tcpTransport{sameHost: sameHostSupported} }

// PlainTCPTransport returns a Transport that always uses TCP, even to a
// peer on the same host.
func PlainTCPTransport() Transport { return tcpTransport{} }

type tcpTransport struct {
	sameHost bool
	log      *slog.Logger // nil: no logs; a Node gives it its own
}

// loggingTransport is a Transport that can say why it took TCP where a
// same-host socket was expected; NewNode hands it the node's logger.
type loggingTransport interface {
	withLogger(*slog.Logger) Transport
}

func (t tcpTransport) withLogger(l *slog.Logger) Transport {
	t.log = l
	return t
}

// warn logs at warning level if t has a logger.
func (t tcpTransport) warn(msg string, args ...any) {
	if t.log != nil {
		t.log.Warn(msg, args...)
	}
}

func (t tcpTransport) Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen(listenNetwork(addr), addr)
	if err != nil || !t.sameHost {
		return ln, err
	}
	var local []net.Listener
	for _, ap := range sameHostAddrs(ln.Addr()) {
		// A name already taken (by a process that does not hold this TCP
		// port) is left alone: dialers that do not trust its owner fall
		// back to TCP.
		name := sameHostName(ap)
		ul, err := net.Listen("unix", name)
		if err != nil {
			t.warn("same-host socket unavailable; proxies on this host will reach this one over TCP",
				"name", name, "err", err)
			continue
		}
		local = append(local, ul)
	}
	if len(local) == 0 {
		return ln, nil
	}
	return newMultiListener(ln, local), nil
}

// Dial connects over the same-host socket when it can, and TCP otherwise.
// TCP needs no tuning: Go already disables Nagle on TCP connections, which
// matters here because every stream's small writes share this connection.
func (t tcpTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	if ap, err := netip.ParseAddrPort(addr); err == nil && t.sameHost && ap.Addr().Unmap().IsLoopback() {
		// Go's connect is non-blocking: one to a socket whose backlog is
		// full (one that never accepts, a squatter's) fails at once with
		// EAGAIN, rather than waiting as a blocking connect would.
		c, err := d.DialContext(ctx, "unix", sameHostName(ap))
		if err == nil {
			if err = checkSameHostPeer(c); err == nil {
				err = growSendBuffer(c, true)
			}
			if err == nil {
				return c, nil
			}
			c.Close()
			t.warn("same-host socket not used; dialing over TCP", "addr", addr, "err", err)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, ctx.Err())
		}
		// Nobody listens under the name (a peer with the shortcut turned
		// off, or another platform's build), its owner is not trusted, or
		// the socket's buffer stays small: TCP reaches the peer all the
		// same.
	}
	return d.DialContext(ctx, "tcp", addr)
}

// sameHostName is the abstract Unix socket name of the listener at ap.
func sameHostName(ap netip.AddrPort) string {
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	return "@tcpproxy/session/" + ap.String()
}

// listenNetwork is "tcp4" for an IPv4 address, such as 0.0.0.0: Go would
// otherwise listen on the IPv6 wildcard for it too, accepting from IPv6
// peers the configuration did not name (and reporting [::] as the
// address). Other addresses (host names, IPv6, an empty host) keep "tcp".
func listenNetwork(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() {
			return "tcp4"
		}
	}
	return "tcp"
}

// sameHostAddrs lists the loopback addresses a TCP listener at a accepts
// connections on, under which it also listens for same-host peers: its own
// address if that is a loopback one, 127.0.0.1 and ::1 if it listens on
// every address, and none otherwise.
func sameHostAddrs(a net.Addr) []netip.AddrPort {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return nil
	}
	ap := ta.AddrPort()
	ip := ap.Addr().Unmap()
	switch {
	case ip.IsLoopback():
		return []netip.AddrPort{netip.AddrPortFrom(ip, ap.Port())}
	case ip.IsUnspecified() && ip.Is4():
		return []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port())}
	case ip.IsUnspecified():
		return []netip.AddrPort{
			netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port()),
			netip.AddrPortFrom(netip.IPv6Loopback(), ap.Port()),
		}
	}
	return nil
}

// multiListener accepts from several listeners as one; its address is the
// first's (the TCP listener's). Each listener has a goroutine that hands
// its connections over; Close closes them all and waits for those
// goroutines.
type multiListener struct {
	lns   []net.Listener
	conns chan acceptResult
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

type acceptResult struct {
	c   net.Conn
	err error
}

func newMultiListener(primary net.Listener, more []net.Listener) *multiListener {
	m := &multiListener{
		lns:   append([]net.Listener{primary}, more...),
		conns: make(chan acceptResult),
		done:  make(chan struct{}),
	}
	for _, ln := range m.lns {
		m.wg.Go(func() { m.accept(ln) })
	}
	return m
}

// accept passes ln's connections and errors on until ln is closed. An
// error waits for an Accept call like a connection does, so a caller that
// backs off after errors also slows this loop down.
func (m *multiListener) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if _, ok := c.(*net.UnixConn); ok {
			_ = growSendBuffer(c, false) // the dialer chose; best effort
		}
		select {
		case m.conns <- acceptResult{c, err}:
		case <-m.done:
			if c != nil {
				c.Close()
			}
			return
		}
	}
}

// Accept returns the next connection from any of the listeners.
func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case r := <-m.conns:
		return r.c, r.err
	case <-m.done:
		return nil, net.ErrClosed
	}
}

// Close closes every listener and waits for their accept goroutines.
func (m *multiListener) Close() error {
	var errs []error
	m.once.Do(func() {
		close(m.done)
		for _, ln := range m.lns {
			errs = append(errs, ln.Close())
		}
		m.wg.Wait()
	})
	return errors.Join(errs...)
}

// Addr returns the TCP listener's address, the one peers are told.
func (m *multiListener) Addr() net.Addr { return m.lns[0].Addr() }
