package netstack

import (
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// epListener is a net.Listener on a listening gVisor endpoint. It is
// gonet.TCPListener returning *Conn, and net.ErrClosed after Close.
type epListener struct {
	ep   tcpip.Endpoint
	wq   *waiter.Queue
	addr netip.AddrPort
	// onClose runs once, after the endpoint is closed.
	onClose func()

	closeOnce sync.Once
	done      chan struct{}
}

// listen binds and listens on addr in s. The bind names the NIC, so that
// for IPv4 any address is accepted: the proxy's stack listens on synthetic
// addresses it does not own. onClose, if not nil, runs after Close.
func listen(s *stack.Stack, addr netip.AddrPort, backlog int, onClose func()) (*epListener, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: "tcp", Addr: tcpAddr(addr), Err: err}
	}
	wq := new(waiter.Queue)
	ep, terr := s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, wq)
	if terr != nil {
		return nil, opErr(sysErr("socket", terr))
	}
	// As Go's net.Listen does: a restarted server can bind at once while
	// connections of its previous life linger.
	ep.SocketOptions().SetReuseAddress(true)
	bind := tcpip.FullAddress{NIC: nicID, Port: addr.Port()}
	if !addr.Addr().IsUnspecified() {
		bind.Addr = tcpipAddr(addr.Addr())
	}
	if terr := ep.Bind(bind); terr != nil {
		ep.Close()
		return nil, opErr(sysErr("bind", terr))
	}
	if terr := ep.Listen(backlog); terr != nil {
		ep.Close()
		return nil, opErr(sysErr("listen", terr))
	}
	bound, terr := ep.GetLocalAddress()
	if terr == nil {
		addr = netip.AddrPortFrom(addr.Addr(), bound.Port)
	}
	return &epListener{ep: ep, wq: wq, addr: addr, onClose: onClose, done: make(chan struct{})}, nil
}

// Accept implements net.Listener.
func (l *epListener) Accept() (net.Conn, error) {
	c, err := l.accept()
	if err != nil {
		return nil, err // a bare nil, not a nil *Conn in an interface
	}
	return c, nil
}

// claimListener is a Network's listener: a netconn.Listener, whose Accept
// returns the connection as the proxy takes it.
type claimListener struct{ *epListener }

func (l claimListener) Accept() (netconn.Conn, error) {
	c, err := l.accept()
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (l *epListener) accept() (*Conn, error) {
	entry, notify := waiter.NewChannelEntry(waiter.ReadableEvents)
	l.wq.EventRegister(&entry)
	defer l.wq.EventUnregister(&entry)
	for {
		ep, wq, terr := l.ep.Accept(nil)
		if terr == nil {
			return newConn(wq, ep), nil
		}
		if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
			return nil, l.acceptErr(sysErr("accept", terr))
		}
		select {
		case <-notify:
		case <-l.done:
			return nil, l.acceptErr(net.ErrClosed)
		}
	}
}

func (l *epListener) acceptErr(err error) error {
	select {
	case <-l.done:
		err = net.ErrClosed
	default:
	}
	return &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: err}
}

// Close implements net.Listener; pending connections are reset.
func (l *epListener) Close() error {
	err := error(&net.OpError{Op: "close", Net: "tcp", Addr: l.Addr(), Err: net.ErrClosed})
	l.closeOnce.Do(func() {
		close(l.done)
		l.ep.Close()
		if l.onClose != nil {
			l.onClose()
		}
		err = nil
	})
	return err
}

// Addr implements net.Listener; the address is a *net.TCPAddr.
func (l *epListener) Addr() net.Addr { return tcpAddr(l.addr) }
