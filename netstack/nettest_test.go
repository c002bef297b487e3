package netstack_test

import (
	"net"
	"testing"

	"golang.org/x/net/nettest"
)

// TestConnNetConn runs x/net's net.Conn conformance suite on netstack
// connections: a host program's connection to a Network listener, both
// ends, through the in-memory link (two gVisor stacks).
func TestConnNetConn(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)
	nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
		ch := make(chan net.Conn, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				close(ch)
				return
			}
			ch <- c
		}()
		client, err := h.Dial(ctx, claim)
		if err != nil {
			return nil, nil, nil, err
		}
		server, ok := <-ch
		if !ok {
			client.Close()
			return nil, nil, nil, net.ErrClosed
		}
		// The Network's end first: it is what the proxy reads and writes.
		return server, client, func() {
			server.Close()
			client.Close()
		}, nil
	})
}
