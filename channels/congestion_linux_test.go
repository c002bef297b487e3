package channels_test

import (
	"context"
	"net"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

// recordingTransport is plain TCP that keeps the connections it dials
// and accepts, for a test to look at their sockets.
type recordingTransport struct {
	channels.Transport
	mu    sync.Mutex
	conns []net.Conn
}

func (r *recordingTransport) keep(c net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns = append(r.conns, c)
}

func (r *recordingTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := r.Transport.Dial(ctx, addr)
	if err == nil {
		r.keep(c)
	}
	return c, err
}

func (r *recordingTransport) Listen(addr string) (net.Listener, error) {
	ln, err := r.Transport.Listen(addr)
	return recordingListener{ln, r}, err
}

type recordingListener struct {
	net.Listener
	r *recordingTransport
}

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.r.keep(c)
	}
	return c, err
}

func congestionOf(t *testing.T, c net.Conn) string {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	var name string
	var gerr error
	require.NoError(t, rc.Control(func(fd uintptr) {
		name, gerr = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	}))
	require.NoError(t, gerr)
	return name
}

// otherCongestion returns an algorithm this host offers that is not its
// default, so that finding it on a socket shows it was set.
func otherCongestion(t *testing.T) string {
	t.Helper()
	def, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	require.NoError(t, err)
	avail, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	require.NoError(t, err)
	for _, name := range strings.Fields(string(avail)) {
		if name != strings.TrimSpace(string(def)) && channels.CheckCongestionControl(name) == nil {
			return name
		}
	}
	t.Skipf("this host offers no congestion control but its default (%s)", avail)
	return ""
}

// TestSessionCongestionControl: CongestionControl is set on the sessions'
// TCP connections at both ends, with and without TLS, and a name the
// kernel does not have is refused when the node is made, naming what it
// has.
func TestSessionCongestionControl(t *testing.T) {
	_, err := channels.NewNode(func() channels.Config {
		c := baseConfig("a", channels.PlainTCPTransport(), membership.Static())
		c.CongestionControl = "no-such-algorithm"
		return c
	}())
	require.ErrorContains(t, err, `congestion control "no-such-algorithm" is not available on this host (available: `)

	algo := otherCongestion(t)
	ca, files := writeCerts(t, t.TempDir(), "a", "b")
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"plain", false}, {"tls", true}} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recordingTransport{Transport: channels.PlainTCPTransport()}
			req, reply, a, b := pair(t, rec, func(c *channels.Config) {
				c.CongestionControl = algo
				if tc.tls {
					useCerts(t, ca, files)(c)
				}
			})
			s, in := open(t, req, reply)
			defer s.Close()
			defer in.Stream.Close()
			// Every session handshaken at both ends: each connection had
			// its algorithm set before.
			sessionsUp(t, a, "b", channels.DefaultSessionsPerPeer)
			sessionsUp(t, b, "a", channels.DefaultSessionsPerPeer)
			rec.mu.Lock()
			conns := append([]net.Conn(nil), rec.conns...)
			rec.mu.Unlock()
			require.GreaterOrEqual(t, len(conns), 2, "a dialed and an accepted connection")
			for _, c := range conns {
				require.Equal(t, algo, congestionOf(t, c), "%s -> %s", c.LocalAddr(), c.RemoteAddr())
			}
		})
	}
}
