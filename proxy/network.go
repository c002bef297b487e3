package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// Network is where the legacy program's TCP sockets live: plain host sockets
// on 127.0.0.0/8 (Loopback), or a gVisor stack reached through a TUN device
// or an in-memory link (package netstack). The proxy never knows which.
//
// A Network whose link can fail for good (netstack's on a TUN device that
// was deleted) has the methods of FailingNetwork; the proxy then reports
// the failure as an Error matching ErrNetworkFailed, since no connection
// reaches it any more.
//
// Its connections are netconn.Conn: they half-close (CloseWrite) and reset
// (SetLinger(0), then Close), as *net.TCPConn does, so that both cross the
// proxy.
type Network interface {
	// Listen accepts TCP connections to addr, which is one of the proxy's
	// synthetic addresses (a request IP or a remote member's instance IP).
	Listen(ctx context.Context, addr netip.AddrPort) (netconn.Listener, error)
	// Dial connects to the legacy server at dst. When src is valid the
	// connection originates from src (with an ephemeral port), so the legacy
	// server sees the calling instance's IP as the peer address.
	Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (netconn.Conn, error)
	// Close releases the network; listeners and connections it made fail.
	Close() error
}

// FailingNetwork is a Network whose link can fail for good.
type FailingNetwork interface {
	Network
	// Failed is closed once the link has failed; Err then says why.
	Failed() <-chan struct{}
	Err() error
}

// ErrNetworkFailed is matched by the Error event of a FailingNetwork's
// failure: the instance no longer reaches, nor is reached by, its legacy
// programs, and an embedding program should stop it (tcpproxy run exits).
var ErrNetworkFailed = errors.New("proxy: network failed")

// watchNetwork emits the failure of a FailingNetwork as an Error, until
// the proxy stops.
func (p *Proxy) watchNetwork(n FailingNetwork) {
	select {
	case <-n.Failed():
		p.emit(Error{Err: fmt.Errorf("%w: %w", ErrNetworkFailed, n.Err())})
	case <-p.ctx.Done():
	}
}
