package netstack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tcpproxy/tcpproxy/tun"

	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// Network is the proxy's side of a gVisor stack; it implements
// proxy.Network. Listen claims synthetic addresses, Dial originates
// connections from any source IP. Make one with NewMemory or NewTUN.
type Network struct {
	opts  Options
	stack *stack.Stack
	// closeLink stops the link after the stack is torn down (closes the
	// TUN and waits for its reader); nil for the in-memory link.
	closeLink func() error
	dev       *tun.Device // nil unless made by NewTUN

	mu     sync.Mutex
	closed bool
	claims map[netip.AddrPort]*epListener

	closeOnce sync.Once
	closeErr  error
}

// newNetwork builds the proxy stack on link. The NIC is promiscuous (it
// accepts packets to any address, so a listener bound to any synthetic IP
// gets its SYNs without the IP being added to the stack) and spoofing (Dial
// may use any source, and listeners answer from any address).
func newNetwork(o Options, link stack.LinkEndpoint) (*Network, error) {
	s, err := newStack(o, link, false)
	if err != nil {
		return nil, err
	}
	n := &Network{
		opts:   o,
		stack:  s,
		claims: make(map[netip.AddrPort]*epListener),
	}
	fail := func(what string, terr tcpip.Error) (*Network, error) {
		s.Destroy()
		return nil, fmt.Errorf("netstack: %s: %s", what, terr)
	}
	if terr := s.SetPromiscuousMode(nicID, true); terr != nil {
		return fail("promiscuous mode", terr)
	}
	if terr := s.SetSpoofing(nicID, true); terr != nil {
		return fail("spoofing", terr)
	}
	if terr := s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpipAddr(o.Addr).WithPrefix(),
	}, stack.AddressProperties{PEB: stack.FirstPrimaryEndpoint}); terr != nil {
		return fail(fmt.Sprintf("add address %v", o.Addr), terr)
	}
	// Everything leaves through the link, including packets for addresses
	// the host has claimed (the legacy server's bind IP).
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID}})
	return n, nil
}

// Listen claims addr and returns a listener for the connections to it; SYNs
// to an address:port nobody claimed are refused with RST. addr's IP may be
// any IPv4 address (normally a synthetic one, which needs no other setup)
// or 0.0.0.0 for every address; the port must not be 0. A second claim of
// the same addr fails with EADDRINUSE until the first listener is closed.
//
// Each claim is an ordinary gVisor listening endpoint bound to addr on the
// promiscuous NIC, rather than one tcp.Forwarder for every address: a SYN
// that finds a TIME_WAIT endpoint for its 4-tuple (the host picked an
// ephemeral port it used recently) is handed to a listening endpoint but
// dropped when only a forwarder is installed, which stalls the connect
// for the whole TIME_WAIT (60 s). Listening endpoints also bring SYN
// cookies and a kernel-like backlog.
func (n *Network) Listen(ctx context.Context, addr netip.AddrPort) (netconn.Listener, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: "tcp", Addr: tcpAddr(addr), Err: err}
	}
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}
	if !addr.Addr().Is4() || addr.Port() == 0 {
		return nil, opErr(net.InvalidAddrError("netstack listens on IPv4 addresses with a fixed port"))
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, opErr(net.ErrClosed)
	}
	if _, taken := n.claims[addr]; taken {
		return nil, opErr(os.NewSyscallError("bind", syscall.EADDRINUSE))
	}
	var l *epListener
	l, err := listen(n.stack, addr, n.opts.Backlog, func() { n.release(addr, l) })
	if err != nil {
		return nil, err
	}
	n.claims[addr] = l
	return claimListener{l}, nil
}

// Dial connects to dst from src (any IPv4 address, ephemeral port), or from
// the Network's own address when src is the zero Addr.
func (n *Network) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (netconn.Conn, error) {
	if !src.IsValid() {
		// Explicitly: gVisor picks the source by longest prefix match
		// among all addresses, including the spoofed ones of earlier
		// Dials.
		src = n.opts.Addr
	}
	c, err := dial(ctx, n.stack, src, dst)
	if err != nil {
		return nil, err // a bare nil, not a nil *Conn in an interface
	}
	return c, nil
}

// Close closes every listener, aborts every connection (peers get RST),
// waits for the stack's goroutines and stops the link. It is idempotent.
func (n *Network) Close() error {
	n.closeOnce.Do(func() {
		n.mu.Lock()
		n.closed = true
		ls := make([]*epListener, 0, len(n.claims))
		for _, l := range n.claims {
			ls = append(ls, l)
		}
		n.mu.Unlock()
		for _, l := range ls {
			l.Close()
		}
		// Abort every connection while the NIC is up, so peers get RSTs.
		n.stack.Close()
		n.stack.Wait()
		if n.closeLink != nil {
			n.closeErr = n.closeLink()
		}
	})
	return n.closeErr
}

// release drops l's claim; called by l.Close.
func (n *Network) release(addr netip.AddrPort, l *epListener) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.claims[addr] == l {
		delete(n.claims, addr)
	}
}
