package netstack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// NewMemory returns a Network joined by an in-memory link to a Host: a
// second gVisor stack standing in for the host's kernel, where tests run
// their legacy programs. Nothing touches the kernel and no privilege is
// needed.
//
// The Host sends the synthetic prefixes (opts.Prefixes) over the link,
// except its own addresses (opts.HostAddr and every address a Host.Listen
// has added), which it delivers locally; the Network sends everything over
// the link. So a Host program connecting to a claimed synthetic address
// reaches a Network listener, and a Network Dial to the legacy server's
// bind IP reaches a Host listener, from whatever source the Network chose.
//
// The two sides close independently; close both.
func NewMemory(opts Options) (*Network, *Host, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, nil, err
	}
	if o.HostAddr == o.Addr {
		return nil, nil, fmt.Errorf("netstack: host and proxy stacks share address %v", o.Addr)
	}
	proxyEnd, hostEnd := newMemLink(uint32(o.MTU))
	n, err := newNetwork(o, proxyEnd)
	if err != nil {
		return nil, nil, err
	}
	h, err := newHost(o, hostEnd)
	if err != nil {
		n.Close()
		return nil, nil, err
	}
	return n, h, nil
}

// Host is the far side of NewMemory's link: the stand-in for the host
// kernel where legacy programs listen and connect. It hands out *Conn
// connections.
type Host struct {
	stack   *stack.Stack
	backlog int

	mu        sync.Mutex
	closed    bool
	addrs     map[netip.Addr]bool // addresses on the NIC
	listeners map[*epListener]struct{}

	closeOnce sync.Once
}

func newHost(o Options, link stack.LinkEndpoint) (*Host, error) {
	s, err := newStack(o, link, true)
	if err != nil {
		return nil, err
	}
	h := &Host{
		stack:     s,
		backlog:   o.Backlog,
		addrs:     make(map[netip.Addr]bool),
		listeners: make(map[*epListener]struct{}),
	}
	if err := h.addAddr(o.HostAddr, stack.FirstPrimaryEndpoint); err != nil {
		s.Destroy()
		return nil, err
	}
	routes := make([]tcpip.Route, 0, len(o.Prefixes))
	for _, p := range o.Prefixes {
		routes = append(routes, tcpip.Route{Destination: subnet(p), NIC: nicID})
	}
	s.SetRouteTable(routes)
	return h, nil
}

// addAddr puts a on the host NIC, once. peb says whether the stack may pick
// it as the source of new connections.
func (h *Host) addAddr(a netip.Addr, peb stack.PrimaryEndpointBehavior) error {
	if h.addrs[a] {
		return nil
	}
	if terr := h.stack.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpipAddr(a).WithPrefix(),
	}, stack.AddressProperties{PEB: peb}); terr != nil {
		return fmt.Errorf("netstack: host: add address %v: %s", a, terr)
	}
	h.addrs[a] = true
	return nil
}

// Listen listens on addr, first adding addr's IP to the host (unless it is
// 0.0.0.0), so that the host delivers connections to it locally instead of
// routing them to the Network. The IP stays on the host after the listener
// closes, as a configured address does on a real host. Port 0 picks a free
// port.
func (h *Host) Listen(ctx context.Context, addr netip.AddrPort) (net.Listener, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: "tcp", Addr: tcpAddr(addr), Err: err}
	}
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}
	if !addr.Addr().Is4() {
		return nil, opErr(net.InvalidAddrError("netstack supports IPv4 only"))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, opErr(net.ErrClosed)
	}
	if !addr.Addr().IsUnspecified() {
		// Never primary: connections the host makes keep HostAddr as
		// source, like a kernel's connections to 127.x keep 127.0.0.1.
		if err := h.addAddr(addr.Addr(), stack.NeverPrimaryEndpoint); err != nil {
			return nil, err
		}
	}
	var l *epListener
	l, err := listen(h.stack, addr, h.backlog, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		delete(h.listeners, l)
	})
	if err != nil {
		return nil, err
	}
	h.listeners[l] = struct{}{}
	return l, nil
}

// Dial connects from the host's address to dst: a synthetic address goes
// over the link to the Network, a host address stays on the host.
func (h *Host) Dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	c, err := dial(ctx, h.stack, netip.Addr{}, dst)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Close aborts every connection and listener of the host and stops its
// stack. It is idempotent.
func (h *Host) Close() error {
	h.closeOnce.Do(func() {
		h.mu.Lock()
		h.closed = true
		ls := make([]*epListener, 0, len(h.listeners))
		for l := range h.listeners {
			ls = append(ls, l)
		}
		h.mu.Unlock()
		for _, l := range ls {
			l.Close()
		}
		h.stack.Close()
		h.stack.Wait()
	})
	return nil
}
