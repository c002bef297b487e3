package netstack_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// benchChunk is the write size of the throughput benchmarks: what a proxy's
// splice buffer would hand to Write.
const benchChunk = 128 << 10

// benchThroughput writes b.N chunks from client to server, which discards
// them, and reports the rate and the process's CPU time (user and system,
// which includes the kernel's share of both ends) per chunk: on a busy
// machine the rate varies with what else runs, the CPU time much less.
func benchThroughput(b *testing.B, client, server net.Conn) {
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, server)
		done <- err
	}()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	for range b.N {
		if _, err := client.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, client.(interface{ CloseWrite() error }).CloseWrite())
	require.NoError(b, <-done)
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
}

// cpuTime is the CPU time the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkMemoryThroughput is bulk transfer from a host program to a
// Network listener through the in-memory link: two gVisor stacks.
func BenchmarkMemoryThroughput(b *testing.B) {
	ctx := context.Background()
	n, h := newMemory(b)
	claim, l := listenClaim(ctx, b, n)
	client, server := pair(b, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	benchThroughput(b, client, server)
}

// BenchmarkMemoryThroughputDial is bulk transfer from a Network Dial (from
// a spoofed source) to a host listener.
func BenchmarkMemoryThroughputDial(b *testing.B) {
	ctx := context.Background()
	n, h := newMemory(b)
	server := netip.AddrPortFrom(bindIP, 6379)
	l, err := h.Listen(ctx, server)
	require.NoError(b, err)
	defer l.Close()
	client, accepted := pair(b, l, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
	benchThroughput(b, client, accepted)
}

// BenchmarkDirectTCPThroughput is the baseline: the same transfer over a
// kernel loopback TCP connection.
func BenchmarkDirectTCPThroughput(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	defer l.Close()
	client, server := pair(b, l, func() (net.Conn, error) { return net.Dial("tcp", l.Addr().String()) })
	benchThroughput(b, client, server)
}

// benchConnect opens and closes b.N connections, each exchanging one byte
// so that the handshake has completed on both sides.
func benchConnect(b *testing.B, l net.Listener, dial func() (net.Conn, error)) {
	served := make(chan error, 1)
	go func() {
		buf := make([]byte, 1)
		for {
			c, err := l.Accept()
			if err != nil {
				served <- nil
				return
			}
			_, err = io.ReadFull(c, buf)
			if err == nil {
				_, err = c.Write(buf)
			}
			c.Close()
			if err != nil {
				served <- err
				return
			}
		}
	}()
	buf := make([]byte, 1)
	b.ResetTimer()
	for range b.N {
		c, err := dial()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.StopTimer()
	l.Close()
	require.NoError(b, <-served)
}

// BenchmarkMemoryConnect is connection setup from a host program to a
// claimed address: forwarder handshake, Accept, one round trip, close.
func BenchmarkMemoryConnect(b *testing.B) {
	ctx := context.Background()
	n, h := newMemory(b)
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := netListen(n.Listen(ctx, claim))
	require.NoError(b, err)
	benchConnect(b, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
}

// BenchmarkMemoryConnectDial is connection setup from a spoofed Network
// Dial to a host listener.
func BenchmarkMemoryConnectDial(b *testing.B) {
	ctx := context.Background()
	n, h := newMemory(b)
	server := netip.AddrPortFrom(bindIP, 6379)
	l, err := h.Listen(ctx, server)
	require.NoError(b, err)
	benchConnect(b, l, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
}

// BenchmarkDirectTCPConnect is the kernel loopback baseline for connection
// setup.
func BenchmarkDirectTCPConnect(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	benchConnect(b, l, func() (net.Conn, error) { return net.Dial("tcp", l.Addr().String()) })
}
