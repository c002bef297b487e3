package proxytest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// Run runs the whole conformance suite against the networks newInst makes.
func Run(t *testing.T, newInst NewInstance) {
	tests := []struct {
		name string
		f    func(*testing.T, NewInstance)
	}{
		{"RequestReplyBalanced", testRequestReplyBalanced},
		{"RequestReplyBulk", testRequestReplyBulk},
		{"DuplexCallerIP", testDuplexCallerIP},
		{"DuplexMembership", testDuplexMembership},
		{"HalfClose", testHalfClose},
		{"ResetFromClient", testResetFromClient},
		{"ResetFromServer", testResetFromServer},
		{"ResetAfterHalfClose", testResetAfterHalfClose},
		{"ResetWhileSending", testResetWhileSending},
		{"NoReplyInstance", testNoReplyInstance},
		{"BackPressure", testBackPressure},
		{"Shutdown", testShutdown},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.f(t, newInst) })
	}
}

const (
	reqPort    = 6000
	replyPort  = 7000
	duplexPort = 8000
)

func reqCfg() map[string]proxy.ChannelConfig {
	return map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: reqPort}}
}

func replyCfg() map[string]proxy.ChannelConfig {
	return map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: replyPort}}
}

// whoami answers every connection with the server's iid and the caller
// address it sees, then closes.
func whoami(iid string) func(net.Conn) {
	return func(c net.Conn) {
		fmt.Fprintf(c, "%s %s\n", iid, c.RemoteAddr())
	}
}

// echo copies everything back and half-closes when the client does.
func echo(c net.Conn) {
	_, _ = io.Copy(c, c)
	if hc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
	}
}

// ask connects to addr, reads one line and returns its fields.
func ask(t *testing.T, n *Node, addr netip.AddrPort) []string {
	c := n.Dial(t, addr)
	_ = c.SetReadDeadline(time.Now().Add(Timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err, "read answer through %s", addr)
	_ = c.Close()
	return strings.Fields(line)
}

// waitReady checks that the first event is Ready with the node's bind IP.
func waitReady(t *testing.T, n *Node) {
	e := n.Events.Next(t)
	require.Equal(t, proxy.Ready{BindIP: n.Proxy.BindIP()}, e)
}

func testRequestReplyBalanced(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	var servers []*Node
	for i := range 3 {
		s := c.Add(fmt.Sprintf("server-%d", i), "server", replyCfg())
		s.Serve(t, replyPort, whoami(s.IID))
		servers = append(servers, s)
	}
	client := c.Add("client-0", "client", reqCfg())
	waitReady(t, client)
	ch := client.Events.NextChange(t, "db")
	addr := client.RequestAddr(t, "db")
	require.Equal(t, proxy.Change{Channel: "db", Kind: proxy.KindRequest, Listening: true, IP: addr.Addr(), Port: reqPort}, ch)

	counts := map[string]int{}
	const rounds = 30
	for range rounds {
		f := ask(t, client, addr)
		require.Len(t, f, 2)
		counts[f[0]]++
		// The server sees the client's instance IP, in its own view.
		from, err := netip.ParseAddrPort(f[1])
		require.NoError(t, err)
		assert.Equal(t, c.Node(f[0]).IPOf(t, "client-0"), from.Addr(), "caller address seen by %s", f[0])
	}
	for _, s := range servers {
		assert.Equal(t, rounds/len(servers), counts[s.IID], "round-robin share of %s: %v", s.IID, counts)
	}
}

func testRequestReplyBulk(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	s.Serve(t, replyPort, echo)
	client := c.Add("client-0", "client", reqCfg())
	addr := client.RequestAddr(t, "db")

	const conns, size = 8, 1 << 20
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for range conns {
		conn := client.Dial(t, addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- roundTrip(conn, size)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	st := client.Proxy.Stats()
	require.Len(t, st, 1)
	assert.Equal(t, int64(conns*size), st[0].BytesOut, "bytes into the mesh")
	assert.Equal(t, int64(conns*size), st[0].BytesIn, "bytes back from the mesh")
}

// roundTrip sends size random bytes, half-closes, and checks the echo.
func roundTrip(conn net.Conn, size int) error {
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		if err == nil {
			err = conn.(interface{ CloseWrite() error }).CloseWrite()
		}
		werr <- err
	}()
	got, err := readAll(conn)
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(payload, got) {
		return fmt.Errorf("echo differs: sent %d bytes, got %d", len(payload), len(got))
	}
	return nil
}

func duplexCfg(mode proxy.Mode) map[string]proxy.ChannelConfig {
	return map[string]proxy.ChannelConfig{"peers": {Kind: proxy.KindDuplex, Port: duplexPort, Mode: mode}}
}

func testDuplexCallerIP(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	iids := []string{"peer-a", "peer-b", "peer-c"}
	for _, iid := range iids {
		n := c.Add(iid, "peer", duplexCfg(proxy.ModeBoth))
		n.Serve(t, duplexPort, whoami(iid))
	}
	for _, from := range iids {
		n := c.Node(from)
		for _, to := range iids {
			if to == from {
				continue
			}
			target := netip.AddrPortFrom(n.IPOf(t, to), duplexPort)
			require.EventuallyWithT(t, func(ct *assert.CollectT) {
				conn, err := n.Inst.Host.Dial(context.Background(), target)
				if !assert.NoError(ct, err) {
					return
				}
				defer conn.Close()
				_ = conn.SetReadDeadline(time.Now().Add(Timeout))
				line, err := bufio.NewReader(conn).ReadString('\n')
				if !assert.NoError(ct, err) {
					return
				}
				f := strings.Fields(line)
				if !assert.Len(ct, f, 2) {
					return
				}
				assert.Equal(ct, to, f[0], "%s reached the wrong member", from)
				seen, err := netip.ParseAddrPort(f[1])
				assert.NoError(ct, err)
				assert.Equal(ct, c.Node(to).IPOf(t, from), seen.Addr(), "%s's server sees caller %s", to, from)
			}, Timeout, 10*time.Millisecond)
		}
	}
}

func testDuplexMembership(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	a := c.Add("peer-a", "peer", duplexCfg(proxy.ModeConnect))
	waitReady(t, a)
	first := a.Events.NextChange(t, "peers")
	require.Equal(t, []proxy.MemberAddr{{IID: "peer-a", IP: a.Proxy.BindIP(), Port: duplexPort, Self: true}}, first.Members)

	b := c.Add("peer-b", "peer", duplexCfg(proxy.ModeBind))
	b.Serve(t, duplexPort, whoami("peer-b"))
	joined := a.Events.NextChange(t, "peers")
	bIP := a.IPOf(t, "peer-b")
	require.Equal(t, []proxy.MemberAddr{
		{IID: "peer-a", IP: a.Proxy.BindIP(), Port: duplexPort, Self: true},
		{IID: "peer-b", IP: bIP, Port: duplexPort},
	}, joined.Members)
	// The impostor for b is open once the Change is out.
	f := ask(t, a, netip.AddrPortFrom(bIP, duplexPort))
	require.Equal(t, "peer-b", f[0])

	c.Leave("peer-b")
	left := a.Events.NextChange(t, "peers")
	require.Equal(t, first.Members, left.Members)
	// The impostor is closed: nothing accepts there any more.
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	conn, err := a.Inst.Host.Dial(ctx, netip.AddrPortFrom(bIP, duplexPort))
	if err == nil {
		conn.Close()
	}
	require.Error(t, err, "impostor of a departed member still accepts")
}

func testHalfClose(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	// The server reads the whole request to EOF, then answers and closes:
	// the answer can only arrive if the client's FIN crossed the proxy
	// while the other direction stayed open.
	s.Serve(t, replyPort, func(conn net.Conn) {
		req, err := io.ReadAll(conn)
		if err != nil {
			return
		}
		fmt.Fprintf(conn, "got %d bytes: %s", len(req), req)
	})
	client := c.Add("client-0", "client", reqCfg())
	conn := client.Dial(t, client.RequestAddr(t, "db"))
	_, err := conn.Write([]byte("hello"))
	require.NoError(t, err)
	require.NoError(t, conn.(interface{ CloseWrite() error }).CloseWrite())
	got, err := readAll(conn)
	require.NoError(t, err, "answer after half-close")
	require.Equal(t, "got 5 bytes: hello", string(got))
}

// isReset reports whether err is what a reader sees after an RST: an
// error that is not a clean EOF.
func isReset(err error) bool {
	return err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func testResetFromClient(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	serverErr := make(chan error, 1)
	accepted := make(chan struct{})
	s.Serve(t, replyPort, func(conn net.Conn) {
		close(accepted)
		_ = conn.SetReadDeadline(time.Now().Add(Timeout))
		_, err := io.Copy(io.Discard, conn)
		if err == nil {
			err = io.EOF // clean close: not what we want
		}
		serverErr <- err
	})
	client := c.Add("client-0", "client", reqCfg())
	conn := client.Dial(t, client.RequestAddr(t, "db"))
	_, err := conn.Write([]byte("partial request"))
	require.NoError(t, err)
	waitChan(t, accepted, "server accepted")
	require.NoError(t, conn.(interface{ SetLinger(int) error }).SetLinger(0))
	require.NoError(t, conn.Close())
	err = <-serverErr
	require.True(t, isReset(err), "server should see a reset, got %v", err)
}

func testResetFromServer(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	s.Serve(t, replyPort, func(conn net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(conn, buf); err != nil {
			return
		}
		_ = conn.(interface{ SetLinger(int) error }).SetLinger(0)
	})
	client := c.Add("client-0", "client", reqCfg())
	conn := client.Dial(t, client.RequestAddr(t, "db"))
	_, err := conn.Write([]byte("hello"))
	require.NoError(t, err)
	_, err = readAll(conn)
	require.True(t, isReset(err), "client should see a reset, got %v", err)
}

// heldConnection returns both legacy ends of a connection through a
// client and a server instance: the client's, and the server's, which the
// server program hands to the test and neither reads nor writes.
func heldConnection(t *testing.T, newInst NewInstance) (cconn, sconn net.Conn) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	accepted := make(chan net.Conn, 1)
	s.Serve(t, replyPort, func(conn net.Conn) {
		accepted <- conn
		<-t.Context().Done() // the test ends the connection
	})
	client := c.Add("client-0", "client", reqCfg())
	cconn = client.Dial(t, client.RequestAddr(t, "db"))
	select {
	case sconn = <-accepted:
	case <-time.After(Timeout):
		require.FailNow(t, "the server got no connection")
	}
	return cconn, sconn
}

// testResetAfterHalfClose: a legacy program that half-closes and later
// resets must reset its peer's connection too, as a direct connection
// would, although the peer never writes (a write would have found the
// reset on the way back). Both ways: client, then server. After EOF a read
// returns 0 whatever happens, so the peer watches its connection's error,
// as a poller would.
func testResetAfterHalfClose(t *testing.T, newInst NewInstance) {
	for _, byServer := range []bool{false, true} {
		name := "client resets"
		if byServer {
			name = "server resets"
		}
		t.Run(name, func(t *testing.T) {
			cconn, sconn := heldConnection(t, newInst)
			resetter, peer := cconn, sconn
			if byServer {
				resetter, peer = sconn, cconn
			}

			_, err := resetter.Write([]byte("message"))
			require.NoError(t, err)
			require.NoError(t, resetter.(interface{ CloseWrite() error }).CloseWrite())
			got, err := readAll(peer)
			require.NoError(t, err, "the peer reads the message, then EOF")
			require.Equal(t, "message", string(got))

			require.NoError(t, resetter.(interface{ SetLinger(int) error }).SetLinger(0))
			require.NoError(t, resetter.Close())
			err = awaitConnError(t, peer)
			require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the peer saw no reset before its deadline")
			// EPIPE: a kernel socket's reset after the peer's FIN (tcp_reset
			// in CLOSE_WAIT).
			require.True(t, errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET), "the peer saw %v, not a reset", err)
		})
	}
}

// testResetWhileSending: a client uploads to a server that does not read
// until every buffer on the way is full, then resets its connection. The
// server's connection is reset too, although it never reads or writes (a
// read would have drained the path and let the client's proxy read the
// reset), as a direct connection's would be; each way: client, then
// server.
func testResetWhileSending(t *testing.T, newInst NewInstance) {
	for _, byServer := range []bool{false, true} {
		name := "client resets"
		if byServer {
			name = "server resets"
		}
		t.Run(name, func(t *testing.T) {
			cconn, sconn := heldConnection(t, newInst)
			sender, peer := cconn, sconn
			if byServer {
				sender, peer = sconn, cconn
			}

			chunk := make([]byte, 256<<10)
			stalled := false
			for range 1024 { // 256 MiB: more than every buffer on the path
				require.NoError(t, sender.SetWriteDeadline(time.Now().Add(time.Second)))
				if _, err := sender.Write(chunk); err != nil {
					require.True(t, isTimeout(err), "the write should stall, not fail: %v", err)
					stalled = true
					break
				}
			}
			require.True(t, stalled, "the path took 256 MiB from a sender whose peer does not read")
			require.NoError(t, sender.(interface{ SetLinger(int) error }).SetLinger(0))
			require.NoError(t, sender.Close())
			err := awaitConnError(t, peer)
			require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the peer saw no reset before its deadline")
			require.True(t, errors.Is(err, syscall.ECONNRESET), "the peer saw %v, not a reset", err)
		})
	}
}

// awaitConnError waits, within Timeout, for conn to report an error after
// its EOF: a kernel socket's SO_ERROR, or a netstack connection's
// AwaitReset.
func awaitConnError(t *testing.T, conn net.Conn) error {
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(Timeout)))
	if r, ok := conn.(interface{ AwaitReset() error }); ok {
		if err := r.AwaitReset(); err != nil {
			return err
		}
		return os.ErrDeadlineExceeded
	}
	sc, ok := conn.(syscall.Conn)
	require.True(t, ok, "%T has neither AwaitReset nor a socket", conn)
	rc, err := sc.SyscallConn()
	require.NoError(t, err)
	var soErr int
	err = rc.Read(func(fd uintptr) bool {
		soErr, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		return soErr != 0
	})
	if err != nil {
		return err
	}
	return syscall.Errno(soErr)
}

func testNoReplyInstance(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	client := c.Add("client-0", "client", reqCfg())
	// The proxy accepts, finds no reply instance and resets; on a fast
	// path the RST can even beat the end of connect().
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	conn, err := client.Inst.Host.Dial(ctx, client.RequestAddr(t, "db"))
	if err == nil {
		defer conn.Close()
		_, err = readAll(conn)
	}
	require.True(t, isReset(err), "a connection with no reply instance should be reset, got %v", err)
	require.Eventually(t, func() bool { return client.Proxy.Stats()[0].Failed == 1 }, Timeout, time.Millisecond)
}

func testBackPressure(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	release := make(chan struct{})
	received := make(chan int64, 1)
	s.Serve(t, replyPort, func(conn net.Conn) {
		<-release // a legacy server that does not read
		n, _ := io.Copy(io.Discard, conn)
		received <- n
	})
	client := c.Add("client-0", "client", reqCfg())
	conn := client.Dial(t, client.RequestAddr(t, "db"))
	// Write far more than any buffer on the path; writes must stall.
	const limit = 256 << 20
	chunk := make([]byte, 256<<10)
	var sent int64
	_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	for sent < limit {
		n, err := conn.Write(chunk)
		sent += int64(n)
		if err != nil {
			require.True(t, isTimeout(err), "write should stall, not fail: %v", err)
			break
		}
	}
	require.Less(t, sent, int64(limit), "the proxy buffered %d bytes for a server that does not read", sent)
	t.Logf("buffered on the path before the writer stalled: %d KiB", sent>>10)
	// Everything accepted is delivered once the server reads.
	close(release)
	require.NoError(t, conn.(interface{ CloseWrite() error }).CloseWrite())
	select {
	case n := <-received:
		require.Equal(t, sent, n)
	case <-time.After(Timeout):
		require.FailNow(t, "server did not receive the data")
	}
}

func testShutdown(t *testing.T, newInst NewInstance) {
	c := NewCluster(t, newInst)
	s := c.Add("server-0", "server", replyCfg())
	s.Serve(t, replyPort, echo)
	client := c.Add("client-0", "client", reqCfg())
	addr := client.RequestAddr(t, "db")
	conn := client.Dial(t, addr)
	require.NoError(t, roundTrip(conn, 1024))

	waitReady(t, client)
	require.True(t, client.Events.NextChange(t, "db").Listening)
	c.Stop("client-0")
	closed := client.Events.NextChange(t, "db")
	require.Equal(t, proxy.Change{Channel: "db", Kind: proxy.KindRequest, Listening: false, IP: addr.Addr(), Port: reqPort}, closed)
	require.IsType(t, proxy.Closed{}, client.Events.Next(t))
	// The port is released: the same address can be listened on again.
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	ln, err := client.Inst.Network.Listen(ctx, addr)
	require.NoError(t, err, "request port still held after Shutdown")
	require.NoError(t, ln.Close())
}

func waitChan(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(Timeout):
		require.FailNow(t, "timed out waiting: "+what)
	}
}
