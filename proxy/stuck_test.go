package proxy_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// TestSessionEndReachesStuckReader: a legacy client that neither reads nor
// writes while its server sends more than every buffer on the way holds;
// then the session between the proxies ends (the server's proxy goes
// away). The client's connection is reset at once: the proxy's write to
// it, blocked, is cut short by the stream's end.
func TestSessionEndReachesStuckReader(t *testing.T) {
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	c.Transport = channels.TCPTransport()
	srv := c.Add("srv", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 26304}})
	stalled := make(chan struct{})
	srv.Serve(t, 26304, func(conn net.Conn) {
		// Writes until nothing moves for a while, then waits.
		for {
			_ = conn.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := conn.Write(make([]byte, 1<<20)); err != nil {
				break
			}
		}
		close(stalled)
		_, _ = io.Copy(io.Discard, conn)
	})
	cli := c.Add("cli", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 26303}})
	addr := cli.RequestAddr(t, "db")
	var conn net.Conn
	require.Eventually(t, func() bool {
		var err error
		conn, err = net.Dial("tcp", addr.String())
		return err == nil
	}, proxytest.Timeout, 10*time.Millisecond, "request channel never listened")
	defer conn.Close()
	require.NoError(t, conn.(*net.TCPConn).SetReadBuffer(64<<10))
	_, err := conn.Write([]byte("go"))
	require.NoError(t, err)
	select {
	case <-stalled:
	case <-time.After(proxytest.Timeout):
		t.Fatal("the server's writes never stalled")
	}

	require.NoError(t, srv.Mesh.Close())
	rc, err := conn.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		var soErr int
		_ = rc.Control(func(fd uintptr) {
			soErr, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		})
		return soErr == int(unix.ECONNRESET)
	}, proxytest.Timeout, 10*time.Millisecond, "the client's connection was not reset")
}
