package mux

import (
	"net"
	"testing"

	"golang.org/x/net/nettest"
)

// TestNetConn runs x/net's net.Conn conformance suite on streams, over
// each kind of connection a session runs on.
func TestNetConn(t *testing.T) {
	for _, k := range []struct {
		name  string
		conns func(testing.TB) (net.Conn, net.Conn)
	}{
		{"pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }},
		{"tcp", tcpConns},
		{"unix", unixConns},
	} {
		t.Run(k.name, func(t *testing.T) {
			nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
				c1, c2 := k.conns(t)
				cli, err := Client(c1, quiet(Config{}))
				if err != nil {
					return nil, nil, nil, err
				}
				srv, err := Server(c2, quiet(Config{}))
				if err != nil {
					cli.Close()
					return nil, nil, nil, err
				}
				a, b := openPairQuiet(cli, srv)
				stop := func() {
					cli.Close()
					srv.Close()
				}
				if a == nil {
					stop()
					return nil, nil, nil, net.ErrClosed
				}
				return a, b, stop, nil
			})
		})
	}
}
