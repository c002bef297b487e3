package channels

import (
	"context"
	"net"
)

// Transport carries the connections sessions run over.
type Transport interface {
	// Listen listens on addr (host:port; port 0 picks one).
	Listen(addr string) (net.Listener, error)
	// Dial connects to addr, giving up when ctx ends.
	Dial(ctx context.Context, addr string) (net.Conn, error)
}

// TCPTransport returns the production Transport: plain TCP sockets.
func TCPTransport() Transport { return tcpTransport{} }

type tcpTransport struct{}

func (tcpTransport) Listen(addr string) (net.Listener, error) {
	return net.Listen("tcp", addr)
}

// Dial needs no tuning: Go already disables Nagle on TCP connections, which
// matters here because every stream's small writes share this connection.
func (tcpTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}
