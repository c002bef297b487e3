// Package sockopt reaches the kernel socket under a connection, for the
// socket options that the standard library does not set: the proxy's
// packages (the multiplexer's pacing, the sessions' congestion control and
// buffers) each need it, and each under TLS as well as in the clear.
package sockopt

import (
	"net"
	"syscall"
)

// TCPConn returns the TCP connection under c, looking through wrappers
// that expose the connection they wrap (NetConn, as a TLS connection
// does), or nil if there is none.
func TCPConn(c net.Conn) *net.TCPConn {
	for {
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = w.NetConn()
	}
	tc, _ := c.(*net.TCPConn)
	return tc
}

// Control runs f on the descriptor of the socket rc, and returns the
// error of either.
func Control(rc syscall.RawConn, f func(fd int) error) error {
	var err error
	if cerr := rc.Control(func(fd uintptr) { err = f(int(fd)) }); cerr != nil {
		return cerr
	}
	return err
}
