package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// Loopback is the Network of ordinary host sockets on 127.0.0.0/8, which
// Linux routes entirely to lo: it needs no privilege. Each synthetic
// address is a real local address, so one host (network namespace) holds
// one instance's view; give proxies that share a host distinct Addressing
// ranges.
type Loopback struct{}

// NewLoopback returns the loopback Network.
func NewLoopback() *Loopback { return &Loopback{} }

func checkLoopback(what string, a netip.Addr) error {
	if !a.Is4() || !loopbackNet.Contains(a) {
		return fmt.Errorf("%s %s is not in 127.0.0.0/8: the loopback network never binds or dials other addresses", what, a)
	}
	return nil
}

// Listen listens on addr, which must be in 127.0.0.0/8 so that no legacy
// port is ever exposed on an external interface.
func (*Loopback) Listen(ctx context.Context, addr netip.AddrPort) (netconn.Listener, error) {
	if err := checkLoopback("listen address", addr.Addr()); err != nil {
		return nil, err
	}
	// No TCP keepalive on legacy sockets: both ends are on this host, so
	// there is no path to probe, and it saves four setsockopt calls per
	// connection.
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(ctx, "tcp4", addr.String())
	if err != nil {
		return nil, fmt.Errorf("loopback listen %s: %w", addr, err)
	}
	return netconn.TCPListener{TCPListener: ln.(*net.TCPListener)}, nil
}

// Dial connects to dst from src (when valid). IP_BIND_ADDRESS_NO_PORT
// defers the choice of source port to connect(), so binding the source
// address does not reserve a port per address up front and thousands of
// connections from one peer IP do not exhaust ephemeral ports early.
func (*Loopback) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (netconn.Conn, error) {
	if err := checkLoopback("destination", dst.Addr()); err != nil {
		return nil, err
	}
	d := net.Dialer{KeepAlive: -1} // see Listen
	var laddr netip.AddrPort
	if src.IsValid() {
		if err := checkLoopback("source", src); err != nil {
			return nil, err
		}
		laddr = netip.AddrPortFrom(src, 0)
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = bindAddressNoPort(fd) }); err != nil {
				return err
			}
			return serr
		}
	}
	var c net.Conn
	var err error
	if laddr.IsValid() {
		// DialTCP with netip addresses skips the resolver and its
		// allocations. (An invalid laddr would make it bind 0.0.0.0:0.)
		c, err = d.DialTCP(ctx, "tcp4", laddr, dst)
	} else {
		c, err = d.DialContext(ctx, "tcp4", dst.String())
	}
	if err != nil {
		return nil, fmt.Errorf("loopback dial %s from %s: %w", dst, src, err)
	}
	return c.(*net.TCPConn), nil
}

// Close does nothing: loopback sockets belong to the listeners and
// connections that use them.
func (*Loopback) Close() error { return nil }
