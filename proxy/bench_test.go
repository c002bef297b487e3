package proxy_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// The benchmarks come in pairs: direct loopback TCP (the limit) and the
// same traffic through a request proxy and a reply proxy joined by a real
// yamux session over TCP. Report ratios, not absolute figures:
//
//	go test -run '^$' -bench . -benchtime 3s ./proxy/

// path is where a benchmark's legacy client connects, with the legacy
// server behind it running handler.
type path func(b *testing.B, handler func(net.Conn)) netip.AddrPort

func directPath(b *testing.B, handler func(net.Conn)) netip.AddrPort {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(b, err)
	b.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, handler)
	return netip.MustParseAddrPort(ln.Addr().String())
}

func proxiedPath(b *testing.B, handler func(net.Conn)) netip.AddrPort {
	c := proxytest.NewCluster(b, proxytest.LoopbackInstance)
	c.Transport = channels.TCPTransport()
	s := c.Add("server-0", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 7000}})
	s.Serve(b, 7000, handler)
	client := c.Add("client-0", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 6000}})
	return client.RequestAddr(b, "db")
}

func acceptLoop(ln net.Listener, handler func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			handler(c)
		}()
	}
}

// sink reads everything and answers with one byte at EOF.
func sink(c net.Conn) {
	_, _ = io.Copy(io.Discard, c)
	_, _ = c.Write([]byte{1})
}

func benchThroughput(b *testing.B, p path) {
	addr := p(b, sink)
	conn, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	defer conn.Close()
	chunk := make([]byte, 128<<10)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		_, err := conn.Write(chunk)
		require.NoError(b, err)
	}
	require.NoError(b, conn.(*net.TCPConn).CloseWrite())
	_, err = io.ReadFull(conn, make([]byte, 1)) // everything arrived
	require.NoError(b, err)
}

func BenchmarkDirectTCPThroughput(b *testing.B)   { benchThroughput(b, directPath) }
func BenchmarkRequestReplyThroughput(b *testing.B) { benchThroughput(b, proxiedPath) }

// pong answers every 64-byte message with itself.
func pong(c net.Conn) {
	buf := make([]byte, 64)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

func benchRoundTrip(b *testing.B, p path) {
	addr := p(b, pong)
	conn, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	defer conn.Close()
	msg, got := make([]byte, 64), make([]byte, 64)
	b.ResetTimer()
	for range b.N {
		_, err := conn.Write(msg)
		require.NoError(b, err)
		_, err = io.ReadFull(conn, got)
		require.NoError(b, err)
	}
}

func BenchmarkDirectTCPRoundTrip(b *testing.B)   { benchRoundTrip(b, directPath) }
func BenchmarkRequestReplyRoundTrip(b *testing.B) { benchRoundTrip(b, proxiedPath) }

func benchConnect(b *testing.B, p path) {
	addr := p(b, pong)
	msg, got := make([]byte, 64), make([]byte, 64)
	var d net.Dialer
	b.ResetTimer()
	for range b.N {
		conn, err := d.DialContext(context.Background(), "tcp4", addr.String())
		require.NoError(b, err)
		_, err = conn.Write(msg)
		require.NoError(b, err)
		_, err = io.ReadFull(conn, got)
		require.NoError(b, err)
		require.NoError(b, conn.Close())
	}
}

func BenchmarkDirectTCPConnect(b *testing.B)   { benchConnect(b, directPath) }
func BenchmarkRequestReplyConnect(b *testing.B) { benchConnect(b, proxiedPath) }
