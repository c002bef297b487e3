package proxy_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

func TestShutdownResetsConnectionsPastDeadline(t *testing.T) {
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	s := c.Add("server-0", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}})
	serverErr := make(chan error, 1)
	accepted := make(chan struct{})
	s.Serve(t, 7000, func(conn net.Conn) {
		close(accepted)
		_ = conn.SetReadDeadline(time.Now().Add(proxytest.Timeout))
		_, err := io.Copy(io.Discard, conn)
		if err == nil {
			err = io.EOF
		}
		serverErr <- err
	})
	client := c.Add("client-0", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 6000}})
	conn := client.Dial(t, client.RequestAddr(t, "db"))
	_, err := conn.Write([]byte("a connection that never finishes"))
	require.NoError(t, err)
	select { // the connection is spliced end to end
	case <-accepted:
	case <-time.After(proxytest.Timeout):
		require.FailNow(t, "legacy server did not get the connection")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err = client.Proxy.Shutdown(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "reset 1 connections")
	// Both legacy sides see the reset.
	_, err = io.ReadAll(conn)
	require.Error(t, err, "client should see a reset")
	select {
	case err := <-serverErr:
		require.False(t, errors.Is(err, io.EOF), "server should see a reset, got %v", err)
	case <-time.After(proxytest.Timeout):
		require.FailNow(t, "server connection not ended")
	}
}

func TestStartFailsWhenRequestPortTaken(t *testing.T) {
	addr := netip.MustParseAddrPort("127.41.0.1:6000")
	ln, err := net.Listen("tcp4", addr.String())
	require.NoError(t, err)
	defer ln.Close()

	mesh, err := channels.NewNode(channels.Config{
		IID: "c", Role: "r", ListenAddr: "mem-c", Transport: channels.NewMemoryTransport(),
		Members: membership.Static(), Logger: slog.New(slog.DiscardHandler),
	})
	require.NoError(t, err)
	p, err := proxy.New(proxy.Config{
		IID: "c", Role: "r",
		Channels:   map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 6000}},
		Addressing: proxy.Addressing{InstanceRange: netip.MustParsePrefix("127.40.0.0/16"), RequestRange: netip.MustParsePrefix("127.41.0.0/16")},
		Network:    proxy.NewLoopback(), Mesh: mesh, Logger: slog.New(slog.DiscardHandler),
	})
	require.NoError(t, err)
	events := proxytest.Record(p.Events())
	err = p.Start(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "listen on request address 127.41.0.1:6000")
	assert.Contains(t, err.Error(), "address already in use")
	ev := events.Next(t)
	require.IsType(t, proxy.Error{}, ev)
	assert.Equal(t, "db", ev.(proxy.Error).Channel)
	require.NoError(t, p.Shutdown(context.Background()))
	require.IsType(t, proxy.Closed{}, events.Next(t))
	events.WaitClosed(t)
	require.NoError(t, mesh.Close())
}

func TestLoopbackRefusesNonLoopbackAddresses(t *testing.T) {
	lb := proxy.NewLoopback()
	_, err := lb.Listen(context.Background(), netip.MustParseAddrPort("0.0.0.0:80"))
	require.ErrorContains(t, err, "not in 127.0.0.0/8")
	_, err = lb.Dial(context.Background(), netip.Addr{}, netip.MustParseAddrPort("192.0.2.1:80"))
	require.ErrorContains(t, err, "not in 127.0.0.0/8")
}

// TestIdleTimeout: a connection that moves no byte for idleTimeout is reset
// on both legacy sides; one that keeps talking outlives it.
func TestIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	s := c.Add("server-0", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}})
	serverErrs := make(chan error, 2)
	s.Serve(t, 7000, func(conn net.Conn) {
		_, err := io.Copy(conn, conn)
		if err == nil {
			err = io.EOF
		}
		serverErrs <- err
	})
	client := c.Add("client-0", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 6000, IdleTimeout: idle}})
	addr := client.RequestAddr(t, "db")

	// A busy connection: one echo every idle/3 for 3 idle periods.
	busy := client.Dial(t, addr)
	tick := time.NewTicker(idle / 3)
	defer tick.Stop()
	for range 9 {
		require.NoError(t, echoByte(busy), "a connection with traffic must not time out")
		<-tick.C
	}

	// A connection that goes quiet after one echo is reset both ways.
	quiet := client.Dial(t, addr)
	require.NoError(t, echoByte(quiet))
	start := time.Now()
	_ = quiet.SetReadDeadline(time.Now().Add(proxytest.Timeout))
	_, err := quiet.Read(make([]byte, 1))
	require.Error(t, err)
	require.False(t, errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded), "client should see a reset, got %v", err)
	assert.GreaterOrEqual(t, time.Since(start), idle/2, "reset before the connection was idle")
	select {
	case err := <-serverErrs:
		require.False(t, errors.Is(err, io.EOF), "server should see a reset, got %v", err)
	case <-time.After(proxytest.Timeout):
		require.FailNow(t, "server side not reset")
	}
	// The busy connection has been quiet since its loop ended: it goes too.
	require.Eventually(t, func() bool { return client.Proxy.Stats()[0].IdleReset == 2 }, proxytest.Timeout, 5*time.Millisecond)
}

// TestFloodDegradesGracefully: with a channel at its limit, a flood of new
// connections is refused at once while every held connection keeps
// working. The figures are logged for the record.
func TestFloodDegradesGracefully(t *testing.T) {
	const limit, flood = 50, 500
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	s := c.Add("server-0", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}})
	s.Serve(t, 7000, func(conn net.Conn) { _, _ = io.Copy(conn, conn) })
	client := c.Add("client-0", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 6000, MaxConnections: limit}})
	addr := client.RequestAddr(t, "db")
	held := make([]net.Conn, 0, limit)
	for range limit {
		conn := client.Dial(t, addr)
		require.NoError(t, echoByte(conn))
		held = append(held, conn)
	}
	start := time.Now()
	errs := make(chan error, flood)
	for range flood {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), proxytest.Timeout)
			defer cancel()
			conn, err := client.Inst.Host.Dial(ctx, addr)
			if err == nil {
				err = echoByte(conn)
				conn.Close()
			}
			errs <- err
		}()
	}
	refused := 0
	for range flood {
		if err := <-errs; err != nil {
			require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "a refusal must be immediate, got %v", err)
			refused++
		}
	}
	elapsed := time.Since(start)
	assert.Equal(t, flood, refused, "every connection past the limit is refused")
	for _, conn := range held {
		require.NoError(t, echoByte(conn), "held connections keep working during the flood")
	}
	st := client.Proxy.Stats()[0]
	assert.Equal(t, int64(flood), st.Refused)
	assert.Equal(t, int64(limit), st.Active)
	t.Logf("flood: %d connections past a limit of %d refused in %s (%.0f/s); all %d held connections still served",
		refused, limit, elapsed.Round(time.Millisecond), float64(refused)/elapsed.Seconds(), limit)
}

// echoByte sends one byte through conn and reads the echo back.
func echoByte(conn net.Conn) error {
	if _, err := conn.Write([]byte("x")); err != nil {
		return err
	}
	_ = conn.SetReadDeadline(time.Now().Add(proxytest.Timeout))
	_, err := io.ReadFull(conn, make([]byte, 1))
	return err
}
