package channels_test

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

// accepting accepts on ln until the test ends, when it closes ln and
// every connection it accepted.
func accepting(t *testing.T, ln net.Listener) <-chan net.Conn {
	conns := make(chan net.Conn, 16)
	done := make(chan struct{})
	var all []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			all = append(all, c)
			conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range all {
			c.Close()
		}
	})
	return conns
}

// dialPair dials addr with tr and returns both ends, taking the accepted
// end from acc. Connections accepted on the way that the dialer gave up
// (a same-host socket it did not take) are skipped.
func dialPair(t *testing.T, tr channels.Transport, acc <-chan net.Conn, addr string) (dialed, accepted net.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dialed, err := tr.Dial(ctx, addr)
	require.NoError(t, err)
	t.Cleanup(func() { dialed.Close() })
	for accepted == nil {
		select {
		case c := <-acc:
			if c.LocalAddr().Network() == dialed.LocalAddr().Network() {
				accepted = c
			}
		case <-ctx.Done():
			t.Fatal("nothing accepted")
		}
	}
	return dialed, accepted
}

// dialOver dials addr with tr, requires both ends to be conns of
// want's type (*net.UnixConn or *net.TCPConn), and sends a message each
// way over the pair.
func dialOver(t *testing.T, tr channels.Transport, acc <-chan net.Conn, addr string, want net.Conn, msgAndArgs ...any) {
	t.Helper()
	d, a := dialPair(t, tr, acc, addr)
	require.IsType(t, want, d, msgAndArgs...)
	require.IsType(t, want, a, msgAndArgs...)
	sendBothWays(t, d, a)
}

// sendBothWays sends a message each way and half-closes both, checking the
// bytes and the EOF on the far side.
func sendBothWays(t *testing.T, a, b net.Conn) {
	t.Helper()
	type halfCloser interface{ CloseWrite() error }
	for _, p := range [][2]net.Conn{{a, b}, {b, a}} {
		msg := []byte("hello from " + p[0].LocalAddr().Network())
		_, err := p[0].Write(msg)
		require.NoError(t, err)
		require.NoError(t, p[0].(halfCloser).CloseWrite())
		got, err := io.ReadAll(p[1])
		require.NoError(t, err)
		require.Equal(t, msg, got)
	}
}

func TestTCPTransportFallsBackToTCP(t *testing.T) {
	// A peer listening with the shortcut turned off has no Unix socket.
	ln, err := channels.PlainTCPTransport().Listen("127.0.0.1:0")
	require.NoError(t, err)
	dialOver(t, channels.TCPTransport(), accepting(t, ln), ln.Addr().String(), &net.TCPConn{})
}

func TestTCPTransportListenerClose(t *testing.T) {
	tr := channels.TCPTransport()
	ln, err := tr.Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	accepted := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		accepted <- err
	}()
	require.NoError(t, ln.Close())
	require.ErrorIs(t, <-accepted, net.ErrClosed, "Close wakes a waiting Accept")
	_, err = ln.Accept()
	require.ErrorIs(t, err, net.ErrClosed)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = tr.Dial(ctx, addr)
	require.Error(t, err, "neither the Unix socket nor the TCP port is left open")
}

func portOf(t *testing.T, a net.Addr) string {
	t.Helper()
	_, port, err := net.SplitHostPort(a.String())
	require.NoError(t, err)
	return port
}

// TestTCPTransportListensOnTheFamilyNamed: listen: 0.0.0.0 listens on
// IPv4 only, as it says (Go would take the IPv6 wildcard too, and report
// [::]); an empty host keeps both.
func TestTCPTransportListensOnTheFamilyNamed(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"0.0.0.0:0", "0.0.0.0"},
		{"127.0.0.1:0", "127.0.0.1"},
	} {
		ln, err := channels.PlainTCPTransport().Listen(tc.addr)
		require.NoError(t, err)
		host, _, err := net.SplitHostPort(ln.Addr().String())
		require.NoError(t, err)
		assert.Equal(t, tc.want, host, "listening on %s", tc.addr)
		require.NoError(t, ln.Close())
	}
}
