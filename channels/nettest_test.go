package channels_test

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/tcpproxy/tcpproxy/channels"
)

// TestStreamNetConn runs x/net's net.Conn conformance suite on channel
// streams, over the in-memory transport and over TCP.
func TestStreamNetConn(t *testing.T) {
	for _, tc := range []struct {
		name string
		tr   channels.Transport
	}{
		{"memory", channels.NewMemoryTransport()},
		{"tcp", channels.TCPTransport()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, reply, _, _ := pair(t, tc.tr, nil)
			nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				s, _, err := req.Open(ctx, channels.Header{SourcePort: 1234, TargetPort: 80})
				if err != nil {
					return nil, nil, nil, err
				}
				in, err := reply.Accept(ctx)
				if err != nil {
					s.Close()
					return nil, nil, nil, err
				}
				return s, in.Stream, func() {
					s.Close()
					in.Stream.Close()
				}, nil
			})
		})
	}
}
