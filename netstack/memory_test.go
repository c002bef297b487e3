package netstack_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

var (
	requestIP  = netip.MustParseAddr("127.1.0.1")
	bindIP     = netip.MustParseAddr("127.0.0.2")
	peerIP     = netip.MustParseAddr("127.0.0.9")
	hostIP     = netip.MustParseAddr("127.0.0.1")
	defaultSrc = netip.MustParseAddr("127.1.255.254")
)

// netListen takes a Network's claim as a net.Listener, as the tests use
// the Host's listeners and the kernel's.
func netListen(l netconn.Listener, err error) (net.Listener, error) {
	if err != nil {
		return nil, err
	}
	return netconn.NetListener(l), nil
}

func newMemory(t testing.TB) (*netstack.Network, *netstack.Host) {
	t.Helper()
	n, h, err := netstack.NewMemory(netstack.Options{})
	require.NoError(t, err)
	t.Cleanup(func() {
		assert.NoError(t, n.Close())
		assert.NoError(t, h.Close())
	})
	return n, h
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// accept returns a channel that yields l's next connection.
func accept(t testing.TB, l net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if !assert.NoError(t, err) {
			close(ch)
			return
		}
		ch <- c
	}()
	return ch
}

// pair returns both ends of a connection from dial to l.
func pair(t testing.TB, l net.Listener, dial func() (net.Conn, error)) (dialed, accepted net.Conn) {
	t.Helper()
	ch := accept(t, l)
	dialed, err := dial()
	require.NoError(t, err)
	accepted, ok := <-ch
	require.True(t, ok)
	t.Cleanup(func() {
		dialed.Close()
		accepted.Close()
	})
	return dialed, accepted
}

// listenClaim has n listen on requestIP:6379 until the test ends.
func listenClaim(ctx context.Context, t testing.TB, n *netstack.Network) (netip.AddrPort, net.Listener) {
	t.Helper()
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	return claim, l
}

func addrPort(t testing.TB, a net.Addr) netip.AddrPort {
	t.Helper()
	ta, ok := a.(*net.TCPAddr)
	require.True(t, ok, "address %v is %T, not *net.TCPAddr", a, a)
	return ta.AddrPort()
}

func TestMemoryHostReachesClaimedAddress(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)
	assert.Equal(t, claim, addrPort(t, l.Addr()))

	client, server := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	assert.Equal(t, claim, addrPort(t, server.LocalAddr()))
	assert.Equal(t, hostIP, addrPort(t, server.RemoteAddr()).Addr())
	assert.Equal(t, addrPort(t, client.LocalAddr()), addrPort(t, server.RemoteAddr()))

	// Echo 1 MiB: the client writes everything, half-closes and reads the
	// echo back; the server copies until EOF and half-closes in turn.
	want := make([]byte, 1<<20)
	_, _ = rand.Read(want)
	echoed := make(chan error, 1)
	go func() {
		_, err := io.Copy(server, server)
		if err == nil {
			err = server.(interface{ CloseWrite() error }).CloseWrite()
		}
		echoed <- err
	}()
	wrote := make(chan error, 1)
	go func() {
		_, err := client.Write(want)
		if err == nil {
			err = client.(interface{ CloseWrite() error }).CloseWrite()
		}
		wrote <- err
	}()
	got, err := io.ReadAll(client)
	require.NoError(t, err)
	require.NoError(t, <-wrote)
	require.NoError(t, <-echoed)
	require.True(t, bytes.Equal(want, got), "echo differs: got %d bytes, want %d", len(got), len(want))
}

func TestMemoryUnclaimedIsRefused(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)

	start := time.Now()
	_, err := h.Dial(ctx, netip.AddrPortFrom(requestIP, 81))
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
	assert.Less(t, time.Since(start), time.Second, "refusal must be an RST, not a timeout")

	// A released claim refuses again.
	claim := netip.AddrPortFrom(requestIP, 82)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(t, err)
	require.NoError(t, l.Close())
	_, err = h.Dial(ctx, claim)
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
}

func TestMemoryListenClaimsOnce(t *testing.T) {
	ctx := testCtx(t)
	n, _ := newMemory(t)
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(t, err)
	_, err = netListen(n.Listen(ctx, claim))
	require.ErrorIs(t, err, syscall.EADDRINUSE)
	require.NoError(t, l.Close())
	require.ErrorIs(t, l.Close(), net.ErrClosed)
	_, err = l.Accept()
	require.ErrorIs(t, err, net.ErrClosed)

	l, err = netListen(n.Listen(ctx, claim))
	require.NoError(t, err, "the claim must be free after Close")
	require.NoError(t, l.Close())
}

func TestMemoryWildcardClaim(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	l, err := netListen(n.Listen(ctx, netip.AddrPortFrom(netip.IPv4Unspecified(), 7000)))
	require.NoError(t, err)
	defer l.Close()
	exact, err := netListen(n.Listen(ctx, netip.AddrPortFrom(requestIP, 7000)))
	require.NoError(t, err)
	defer exact.Close()

	other := netip.AddrPortFrom(netip.MustParseAddr("127.0.44.7"), 7000)
	_, server := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, other) })
	assert.Equal(t, other, addrPort(t, server.LocalAddr()))
	_, server = pair(t, exact, func() (net.Conn, error) { return h.Dial(ctx, netip.AddrPortFrom(requestIP, 7000)) })
	assert.Equal(t, requestIP, addrPort(t, server.LocalAddr()).Addr())
}

func TestMemoryDialFromSpoofedSource(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	server := netip.AddrPortFrom(bindIP, 6379)
	l, err := h.Listen(ctx, server)
	require.NoError(t, err)
	defer l.Close()

	dialed, accepted := pair(t, l, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
	assert.Equal(t, peerIP, addrPort(t, accepted.RemoteAddr()).Addr(), "the legacy server must see the peer's instance IP")
	assert.Equal(t, addrPort(t, dialed.LocalAddr()), addrPort(t, accepted.RemoteAddr()))
	assert.NotZero(t, addrPort(t, dialed.LocalAddr()).Port())
	assert.Equal(t, server, addrPort(t, accepted.LocalAddr()))
	roundTrip(t, dialed, accepted)
	roundTrip(t, accepted, dialed)

	// Without a source the Network's own address is used.
	dialed, accepted = pair(t, l, func() (net.Conn, error) { return n.Dial(ctx, netip.Addr{}, server) })
	assert.Equal(t, defaultSrc, addrPort(t, accepted.RemoteAddr()).Addr())
	roundTrip(t, dialed, accepted)

	// Nothing listens on the bind IP's other ports: the host refuses.
	_, err = n.Dial(ctx, peerIP, netip.AddrPortFrom(bindIP, 1))
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
}

func TestMemoryHostLocalDelivery(t *testing.T) {
	ctx := testCtx(t)
	_, h := newMemory(t)
	server := netip.AddrPortFrom(bindIP, 5432)
	l, err := h.Listen(ctx, server)
	require.NoError(t, err)
	defer l.Close()
	// A host program reaches another host program without the Network.
	client, accepted := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, server) })
	roundTrip(t, client, accepted)
}

func roundTrip(t testing.TB, from, to net.Conn) {
	t.Helper()
	msg := []byte("ping " + from.LocalAddr().String())
	_, err := from.Write(msg)
	require.NoError(t, err)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(to, got)
	require.NoError(t, err)
	require.Equal(t, msg, got)
}

// listenBothSides claims requestIP:6379 on the network and listens on
// bindIP:6379 on the host; both listeners close at test end.
func listenBothSides(ctx context.Context, t *testing.T, n *netstack.Network, h *netstack.Host) (claim netip.AddrPort, l, hl net.Listener) {
	claim = netip.AddrPortFrom(requestIP, 6379)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	hl, err = h.Listen(ctx, netip.AddrPortFrom(bindIP, 6379))
	require.NoError(t, err)
	t.Cleanup(func() { hl.Close() })
	return claim, l, hl
}

type halfCloser interface {
	net.Conn
	CloseWrite() error
	SetLinger(int) error
}

func TestMemoryHalfClose(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l, hl := listenBothSides(ctx, t, n, h)

	cases := map[string]func() (net.Conn, net.Conn){
		"host to network": func() (net.Conn, net.Conn) {
			return pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
		},
		"network to host": func() (net.Conn, net.Conn) {
			return pair(t, hl, func() (net.Conn, error) { return n.Dial(ctx, peerIP, netip.AddrPortFrom(bindIP, 6379)) })
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			for _, dir := range []string{"dialer closes", "acceptor closes"} {
				a, b := mk()
				if dir == "acceptor closes" {
					a, b = b, a
				}
				_, err := a.Write([]byte("last words"))
				require.NoError(t, err)
				require.NoError(t, a.(halfCloser).CloseWrite())
				got, err := io.ReadAll(b)
				require.NoError(t, err, dir)
				require.Equal(t, "last words", string(got))
				_, err = a.Write([]byte("x"))
				require.ErrorIs(t, err, syscall.EPIPE, "write after CloseWrite")

				// The other direction still flows, then closes too.
				roundTrip(t, b, a)
				require.NoError(t, b.(halfCloser).CloseWrite())
				rest, err := io.ReadAll(a)
				require.NoError(t, err)
				require.Empty(t, rest)
			}
		})
	}
}

func TestMemoryLingerZeroResets(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l, hl := listenBothSides(ctx, t, n, h)

	cases := map[string]func() (net.Conn, net.Conn){
		"network resets host": func() (net.Conn, net.Conn) {
			client, server := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
			return server, client
		},
		"host resets network": func() (net.Conn, net.Conn) {
			client, server := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
			return client, server
		},
		"dialed network conn resets legacy server": func() (net.Conn, net.Conn) {
			return pair(t, hl, func() (net.Conn, error) { return n.Dial(ctx, peerIP, netip.AddrPortFrom(bindIP, 6379)) })
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			resetter, peer := mk()
			roundTrip(t, resetter, peer)
			require.NoError(t, resetter.(halfCloser).SetLinger(0))
			require.NoError(t, resetter.Close())
			_, err := peer.Read(make([]byte, 1))
			require.ErrorIs(t, err, syscall.ECONNRESET)
			_, err = resetter.Read(make([]byte, 1))
			require.ErrorIs(t, err, net.ErrClosed)
		})
	}
}

func TestMemoryCloseFailsEverything(t *testing.T) {
	ctx := testCtx(t)
	n, h, err := netstack.NewMemory(netstack.Options{})
	require.NoError(t, err)
	defer h.Close()

	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(t, err)
	client, server := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	blocked := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 1))
		blocked <- err
	}()
	acceptErr := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		acceptErr <- err
	}()

	require.NoError(t, n.Close())
	require.NoError(t, n.Close(), "Close is idempotent")
	require.ErrorIs(t, <-acceptErr, net.ErrClosed)
	require.Error(t, <-blocked)
	_, err = client.Read(make([]byte, 1))
	require.ErrorIs(t, err, syscall.ECONNRESET, "the peer of an aborted conn sees a reset")
	_, err = netListen(n.Listen(ctx, claim))
	require.ErrorIs(t, err, net.ErrClosed)
	_, err = n.Dial(ctx, peerIP, netip.AddrPortFrom(bindIP, 1))
	require.Error(t, err)
}

func TestMemoryDeadline(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)
	client, _ := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	require.NoError(t, client.SetReadDeadline(time.Now().Add(10*time.Millisecond)))
	_, err := client.Read(make([]byte, 1))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout())
}

func TestMemoryOptionsValidation(t *testing.T) {
	_, _, err := netstack.NewMemory(netstack.Options{Addr: netip.MustParseAddr("10.0.0.1")})
	require.Error(t, err)
	_, _, err = netstack.NewMemory(netstack.Options{Prefixes: []netip.Prefix{netip.MustParsePrefix("::1/128")}})
	require.Error(t, err)
	_, _, err = netstack.NewMemory(netstack.Options{MTU: 100})
	require.Error(t, err)
}

// TestMemoryReconnectAfterServerClose opens many short connections in a row
// whose server side closes first and so sits in TIME_WAIT. The host picks
// ephemeral ports at random, so new SYNs soon reuse a 4-tuple still in
// TIME_WAIT on the Network; they must still connect at once.
func TestMemoryReconnectAfterServerClose(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)

	const conns = 1500
	served := make(chan error, 1)
	go func() {
		for range conns {
			c, err := l.Accept()
			if err != nil {
				served <- err
				return
			}
			_, err = c.Write([]byte("bye"))
			c.Close()
			if err != nil {
				served <- err
				return
			}
		}
		served <- nil
	}()
	for i := range conns {
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		c, err := h.Dial(dctx, claim)
		cancel()
		require.NoError(t, err, "connection %d", i)
		got, err := io.ReadAll(c)
		c.Close()
		require.NoError(t, err)
		require.Equal(t, "bye", string(got))
	}
	require.NoError(t, <-served)
}

// TestMemoryAwaitReset: after the peer's FIN, AwaitReset reports the
// peer's reset (EPIPE, as Linux reports an RST in CLOSE-WAIT), and returns
// nil, never an error, when the connection closes cleanly, is closed here,
// or its read deadline passes.
func TestMemoryAwaitReset(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l, _ := listenBothSides(ctx, t, n, h)
	// a half-closes; b reads to EOF and waits for a's reset.
	halfClosed := func(t *testing.T) (a, b net.Conn, done <-chan error) {
		a, b = pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
		require.NoError(t, a.(halfCloser).CloseWrite())
		_, err := io.ReadAll(b)
		require.NoError(t, err)
		require.NoError(t, b.SetReadDeadline(time.Now().Add(time.Hour)))
		ch := make(chan error, 1)
		go func() { ch <- b.(interface{ AwaitReset() error }).AwaitReset() }()
		return a, b, ch
	}
	result := func(t *testing.T, ch <-chan error) error {
		select {
		case err := <-ch:
			return err
		case <-ctx.Done():
			require.FailNow(t, "AwaitReset did not return")
			return nil
		}
	}

	t.Run("peer resets", func(t *testing.T) {
		a, _, ch := halfClosed(t)
		require.NoError(t, a.(halfCloser).SetLinger(0))
		require.NoError(t, a.Close())
		require.ErrorIs(t, result(t, ch), syscall.EPIPE)
	})
	t.Run("clean close", func(t *testing.T) {
		a, b, ch := halfClosed(t)
		require.NoError(t, b.(halfCloser).CloseWrite())
		_, err := io.ReadAll(a)
		require.NoError(t, err)
		require.NoError(t, result(t, ch), "both FINs: no reset, and no wait for the deadline an hour away")
	})
	t.Run("closed here", func(t *testing.T) {
		_, b, ch := halfClosed(t)
		require.NoError(t, b.Close())
		require.NoError(t, result(t, ch))
	})
	t.Run("read deadline", func(t *testing.T) {
		_, b, ch := halfClosed(t)
		require.NoError(t, b.SetReadDeadline(time.Now()))
		require.NoError(t, result(t, ch))
	})
}
