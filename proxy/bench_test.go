package proxy_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// The benchmarks come in sets: direct loopback TCP (the limit), the same
// traffic through a request proxy and a reply proxy joined by a real mux
// session over TCP, and through a duplex connect-mode proxy (impostor) and
// a bind-mode one. Everything runs in this process, so besides ns/op each
// reports cpu-ns/op, the CPU time of the whole process (client, proxies,
// server, kernel work on their behalf) per op: it is what limits a busy
// machine and is far less noisy than wall time on a shared one. Compare
// ratios, not absolute figures:
//
//	go test -run '^$' -bench . -benchtime 3s -count 5 ./proxy/ | benchstat -
//
// The whole-system benchmark with separate processes, socat and haproxy is
// `go run ./scripts/bench`.

// Ports of the benchmarks' legacy programs, apart from the conformance
// suite's so that benchmarks and tests can run at the same time.
const (
	benchRequestPort = 26000
	benchReplyPort   = 27000
	benchDuplexPort  = 27100
)

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
	s := c.Add("server-0", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: benchReplyPort}})
	s.Serve(b, benchReplyPort, handler)
	client := c.Add("client-0", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: benchRequestPort}})
	return client.RequestAddr(b, "db")
}

// duplexPath is a connect-mode proxy whose impostor for a bind-mode member
// carries the connection to that member's legacy server.
func duplexPath(b *testing.B, handler func(net.Conn)) netip.AddrPort {
	c := proxytest.NewCluster(b, proxytest.LoopbackInstance)
	c.Transport = channels.TCPTransport()
	peers := func(m proxy.Mode) map[string]proxy.ChannelConfig {
		return map[string]proxy.ChannelConfig{"peers": {Kind: proxy.KindDuplex, Port: benchDuplexPort, Mode: m}}
	}
	server := c.Add("peer-b", "peer", peers(proxy.ModeBind))
	server.Serve(b, benchDuplexPort, handler)
	client := c.Add("peer-a", "peer", peers(proxy.ModeConnect))
	addr := netip.AddrPortFrom(client.IPOf(b, "peer-b"), benchDuplexPort)
	require.Eventually(b, func() bool {
		conn, err := net.DialTimeout("tcp4", addr.String(), time.Second)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	}, proxytest.Timeout, 10*time.Millisecond, "impostor %s never listened", addr)
	return addr
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

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter reports the process's CPU time per op; start it right after
// b.ResetTimer and stop it after the loop.
type cpuMeter struct {
	b     *testing.B
	start time.Duration
}

func meterCPU(b *testing.B) *cpuMeter { return &cpuMeter{b: b, start: cpuTime()} }

func (m *cpuMeter) stop() {
	m.b.ReportMetric(float64(cpuTime()-m.start)/float64(m.b.N), "cpu-ns/op")
}

// sink reads everything and answers with one byte at EOF.
func sink(c net.Conn) {
	buf := make([]byte, 256<<10)
	for {
		_, err := c.Read(buf)
		if err == io.EOF {
			_, _ = c.Write([]byte{1})
			return
		}
		if err != nil {
			return
		}
	}
}

const chunk = 128 << 10

// benchThroughput sends b.N chunks on each of conns connections.
func benchThroughput(b *testing.B, p path, conns int) {
	addr := p(b, sink)
	cs := make([]*net.TCPConn, conns)
	for i := range cs {
		conn, err := net.Dial("tcp4", addr.String())
		require.NoError(b, err)
		defer conn.Close()
		cs[i] = conn.(*net.TCPConn)
	}
	buf := make([]byte, chunk)
	b.SetBytes(int64(chunk * conns))
	b.ResetTimer()
	cpu := meterCPU(b)
	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i, conn := range cs {
		wg.Go(func() {
			for range b.N {
				if _, err := conn.Write(buf); err != nil {
					errs[i] = err
					return
				}
			}
			if err := conn.CloseWrite(); err != nil {
				errs[i] = err
				return
			}
			_, errs[i] = io.ReadFull(conn, make([]byte, 1)) // everything arrived
		})
	}
	wg.Wait()
	b.StopTimer()
	cpu.stop()
	for _, err := range errs {
		require.NoError(b, err)
	}
}

// benchDownload: the client sends a request and half-closes; the server
// reads it to EOF and answers with b.N chunks. While the answer flows, the
// proxies watch the half-closed direction for a reset (splice's
// halfCloseWatch), which this measures.
func benchDownload(b *testing.B, p path) {
	n := b.N
	addr := p(b, func(c net.Conn) {
		if _, err := io.Copy(io.Discard, c); err != nil {
			return
		}
		buf := make([]byte, chunk)
		for range n {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	conn, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	defer conn.Close()
	b.SetBytes(chunk)
	b.ResetTimer()
	cpu := meterCPU(b)
	_, err = conn.Write([]byte("GET"))
	require.NoError(b, err)
	require.NoError(b, conn.(*net.TCPConn).CloseWrite())
	got, err := io.Copy(io.Discard, conn)
	b.StopTimer()
	cpu.stop()
	require.NoError(b, err)
	require.Equal(b, int64(n)*chunk, got)
}

func BenchmarkDirectTCPDownload(b *testing.B)    { benchDownload(b, directPath) }
func BenchmarkRequestReplyDownload(b *testing.B) { benchDownload(b, proxiedPath) }

func BenchmarkDirectTCPThroughput(b *testing.B)    { benchThroughput(b, directPath, 1) }
func BenchmarkRequestReplyThroughput(b *testing.B) { benchThroughput(b, proxiedPath, 1) }
func BenchmarkDuplexThroughput(b *testing.B)       { benchThroughput(b, duplexPath, 1) }

func BenchmarkDirectTCPThroughput8(b *testing.B)    { benchThroughput(b, directPath, 8) }
func BenchmarkRequestReplyThroughput8(b *testing.B) { benchThroughput(b, proxiedPath, 8) }

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
	cpu := meterCPU(b)
	for range b.N {
		_, err := conn.Write(msg)
		require.NoError(b, err)
		_, err = io.ReadFull(conn, got)
		require.NoError(b, err)
	}
	cpu.stop()
}

// benchRoundTripParallel is benchRoundTrip from 64 clients at once, each
// with its own connection (all on one session through the proxies).
func benchRoundTripParallel(b *testing.B, p path) {
	addr := p(b, pong)
	b.SetParallelism(32) // × GOMAXPROCS (2 here) clients
	b.ResetTimer()
	cpu := meterCPU(b)
	b.RunParallel(func(pb *testing.PB) {
		conn, err := net.Dial("tcp4", addr.String())
		if err != nil {
			b.Error(err)
			return
		}
		defer conn.Close()
		msg, got := make([]byte, 64), make([]byte, 64)
		for pb.Next() {
			if _, err := conn.Write(msg); err != nil {
				b.Error(err)
				return
			}
			if _, err := io.ReadFull(conn, got); err != nil {
				b.Error(err)
				return
			}
		}
	})
	cpu.stop()
}

func BenchmarkDirectTCPRoundTripParallel(b *testing.B)    { benchRoundTripParallel(b, directPath) }
func BenchmarkRequestReplyRoundTripParallel(b *testing.B) { benchRoundTripParallel(b, proxiedPath) }

func BenchmarkDirectTCPRoundTrip(b *testing.B)    { benchRoundTrip(b, directPath) }
func BenchmarkRequestReplyRoundTrip(b *testing.B) { benchRoundTrip(b, proxiedPath) }
func BenchmarkDuplexRoundTrip(b *testing.B)       { benchRoundTrip(b, duplexPath) }

func benchConnect(b *testing.B, p path) {
	addr := p(b, pong)
	msg, got := make([]byte, 64), make([]byte, 64)
	var d net.Dialer
	b.ResetTimer()
	cpu := meterCPU(b)
	for range b.N {
		conn, err := d.DialContext(context.Background(), "tcp4", addr.String())
		require.NoError(b, err)
		_, err = conn.Write(msg)
		require.NoError(b, err)
		_, err = io.ReadFull(conn, got)
		require.NoError(b, err)
		require.NoError(b, conn.Close())
	}
	cpu.stop()
}

// benchRoundTripUnderLoad is benchRoundTrip while another connection on
// the same path (so the same multiplexed session) carries bulk data: the
// round trips wait behind the bulk stream's frames. It reports the 99th
// percentile round trip too.
func benchRoundTripUnderLoad(b *testing.B, p path) {
	addr := p(b, func(c net.Conn) {
		var first [1]byte
		if _, err := io.ReadFull(c, first[:]); err != nil {
			return
		}
		if first[0] == 'B' {
			sink(c)
			return
		}
		pong(c)
	})
	bulkConn, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	defer bulkConn.Close()
	stop := make(chan struct{})
	bulkDone := make(chan struct{})
	go func() {
		defer close(bulkDone)
		buf := make([]byte, chunk)
		buf[0] = 'B'
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := bulkConn.Write(buf); err != nil {
				return
			}
		}
	}()
	conn, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	defer conn.Close()
	_, err = conn.Write([]byte{'P'})
	require.NoError(b, err)
	msg, got := make([]byte, 64), make([]byte, 64)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		_, err := conn.Write(msg)
		require.NoError(b, err)
		_, err = io.ReadFull(conn, got)
		require.NoError(b, err)
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	close(stop)
	bulkConn.Close()
	<-bulkDone
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

func BenchmarkDirectTCPRoundTripUnderLoad(b *testing.B) { benchRoundTripUnderLoad(b, directPath) }
func BenchmarkRequestReplyRoundTripUnderLoad(b *testing.B) {
	benchRoundTripUnderLoad(b, proxiedPath)
}

func BenchmarkDirectTCPConnect(b *testing.B)    { benchConnect(b, directPath) }
func BenchmarkRequestReplyConnect(b *testing.B) { benchConnect(b, proxiedPath) }
func BenchmarkDuplexConnect(b *testing.B)       { benchConnect(b, duplexPath) }

// benchIdle opens idleConns connections per op, each checked with one
// round trip, and reports the growth of the process's Go heap, goroutine
// stacks and goroutines per connection while they are open and idle. The
// client and server are in the process too: subtract the direct figures
// to get the proxies' share (two proxies per connection).
func benchIdle(b *testing.B, p path) {
	const idleConns = 1000
	addr := p(b, pong)
	msg, got := make([]byte, 64), make([]byte, 64)
	// One connection first, so that the session and everything else
	// started lazily is in the baseline.
	warm, err := net.Dial("tcp4", addr.String())
	require.NoError(b, err)
	_, err = warm.Write(msg)
	require.NoError(b, err)
	_, err = io.ReadFull(warm, got)
	require.NoError(b, err)
	warm.Close()
	var heap, stack, gor float64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		g0 := runtime.NumGoroutine()
		b.StartTimer()
		conns := make([]net.Conn, 0, idleConns)
		for range idleConns {
			conn, err := net.Dial("tcp4", addr.String())
			require.NoError(b, err)
			conns = append(conns, conn)
			_, err = conn.Write(msg)
			require.NoError(b, err)
			_, err = io.ReadFull(conn, got)
			require.NoError(b, err)
		}
		b.StopTimer()
		time.Sleep(100 * time.Millisecond) // let every goroutine park
		runtime.ReadMemStats(&m1)
		heap += float64(m1.HeapInuse) - float64(m0.HeapInuse)
		stack += float64(m1.StackInuse) - float64(m0.StackInuse)
		gor += float64(runtime.NumGoroutine() - g0)
		for _, c := range conns {
			c.Close()
		}
		if !assert.Eventually(b, func() bool { return runtime.NumGoroutine() <= g0+5 }, proxytest.Timeout, 10*time.Millisecond) {
			buf := make([]byte, 1<<20)
			b.Logf("goroutines %d, before %d\n%s", runtime.NumGoroutine(), g0, buf[:runtime.Stack(buf, true)])
			b.FailNow()
		}
		b.StartTimer()
	}
	n := float64(b.N * idleConns)
	b.ReportMetric(heap/n, "heap-B/conn")
	b.ReportMetric(stack/n, "stack-B/conn")
	b.ReportMetric(gor/n, "goroutines/conn")
}

func BenchmarkDirectTCPIdle(b *testing.B)    { benchIdle(b, directPath) }
func BenchmarkRequestReplyIdle(b *testing.B) { benchIdle(b, proxiedPath) }
func BenchmarkDuplexIdle(b *testing.B)       { benchIdle(b, duplexPath) }
