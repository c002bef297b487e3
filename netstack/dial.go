package netstack

import (
	"context"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// dial connects a new TCP endpoint of s to dst, from src when it is valid
// (any port) and from the stack's primary address otherwise. It is
// gonet.DialTCPWithBind keeping hold of the endpoint, which Conn needs.
func dial(ctx context.Context, s *stack.Stack, src netip.Addr, dst netip.AddrPort) (*Conn, error) {
	opErr := func(err error) error {
		var source net.Addr
		if src.IsValid() {
			source = tcpAddr(netip.AddrPortFrom(src, 0))
		}
		return &net.OpError{Op: "dial", Net: "tcp", Source: source, Addr: tcpAddr(dst), Err: err}
	}
	if !dst.Addr().Is4() || (src.IsValid() && !src.Is4()) {
		return nil, opErr(net.InvalidAddrError("netstack supports IPv4 only"))
	}
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}

	var wq waiter.Queue
	ep, terr := s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, opErr(sysErr("socket", terr))
	}
	// Connect reports completion, success or failure, as writability.
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)

	if src.IsValid() {
		// Binding on an explicit NIC accepts any IPv4 address; the NIC
		// spoofs it (see Network).
		if terr := ep.Bind(tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(src)}); terr != nil {
			ep.Close()
			return nil, opErr(sysErr("bind", terr))
		}
	}
	terr = ep.Connect(fullAddr(dst))
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Abort()
			return nil, opErr(ctx.Err())
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, opErr(sysErr("connect", terr))
	}
	return newConn(&wq, ep), nil
}
