package mux

import (
	"context"
	"io"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-yamux/v5"
	"github.com/stretchr/testify/require"
)

// The benchmarks run one harness over a 127.0.0.1 TCP connection: through
// this package, through go-yamux configured as channels used it, and (for
// throughput) over the bare connection as the baseline. Besides wall time
// they report cpu-ns/op, the CPU time of the whole process (both peers)
// per operation, which is steadier than wall time on a small machine.

const benchChunk = 256 << 10

// cpuTime returns the CPU time the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// startTimer resets the benchmark timer and returns a function that stops
// it and reports cpu-ns/op.
func startTimer(b *testing.B) (stop func()) {
	b.ReportAllocs()
	start := cpuTime(b)
	b.ResetTimer()
	return func() {
		b.StopTimer()
		b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
	}
}

// benchThroughput moves b.N chunks of 256 KiB, one Write each, from the
// writer to the reader that open returns.
func benchThroughput(b *testing.B, open func(b *testing.B) (io.Writer, io.Reader)) {
	w, r := open(b)
	chunk := make([]byte, benchChunk)
	done := make(chan error, 1)
	b.SetBytes(benchChunk)
	stop := startTimer(b)
	go func() {
		for range b.N {
			if _, err := w.Write(chunk); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	buf := make([]byte, benchChunk)
	for left := int64(b.N) * benchChunk; left > 0; {
		n, err := r.Read(buf[:min(left, benchChunk)])
		if err != nil {
			b.Fatal(err)
		}
		left -= int64(n)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	stop()
}

func BenchmarkDirectTCPThroughput(b *testing.B) {
	benchThroughput(b, func(b *testing.B) (io.Writer, io.Reader) {
		c1, c2 := tcpConns(b)
		b.Cleanup(func() { c1.Close(); c2.Close() })
		return c1, c2
	})
}

func BenchmarkMuxThroughput(b *testing.B) {
	benchThroughput(b, func(b *testing.B) (io.Writer, io.Reader) {
		cli, srv := tcpPair(b, Config{})
		st, peer := openPair(b, cli, srv)
		return st, peer
	})
}

func BenchmarkYamuxThroughput(b *testing.B) {
	benchThroughput(b, func(b *testing.B) (io.Writer, io.Reader) {
		cli, srv := yamuxPair(b)
		st, err := cli.OpenStream(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		peer, err := srv.AcceptStream()
		if err != nil {
			b.Fatal(err)
		}
		return st, peer
	})
}

// yamuxConfig is go-yamux as channels configured it.
func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.MaxIncomingStreams = 1 << 16
	c.AcceptBacklog = 1024
	c.ReadBufSize = 64 << 10
	c.MaxMessageSize = 256<<10 + 12
	c.MaxStreamWindowSize = 16 << 20
	c.LogOutput = io.Discard
	return c
}

func yamuxPair(b *testing.B) (cli, srv *yamux.Session) {
	c1, c2 := tcpConns(b)
	cli, err := yamux.Client(c1, yamuxConfig(), nil)
	if err != nil {
		b.Fatal(err)
	}
	srv, err = yamux.Server(c2, yamuxConfig(), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cli.Close(); srv.Close() })
	return cli, srv
}

// benchRequest measures one short exchange per stream: open, a 64-byte
// request, a 64-byte reply, close. The server answers streams in turn.
func benchRequest(b *testing.B, open func() (net.Conn, error), accept func() (net.Conn, error)) {
	go func() {
		buf := make([]byte, 64)
		for {
			st, err := accept()
			if err != nil {
				return
			}
			if _, err := io.ReadFull(st, buf); err == nil {
				_, _ = st.Write(buf)
			}
			st.Close()
		}
	}()
	req := make([]byte, 64)
	reply := make([]byte, 64)
	stop := startTimer(b)
	for range b.N {
		st, err := open()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := st.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(st, reply); err != nil {
			b.Fatal(err)
		}
		st.Close()
	}
	stop()
}

func BenchmarkMuxOpenRequestClose(b *testing.B) {
	cli, srv := tcpPair(b, Config{})
	ctx := context.Background()
	benchRequest(b,
		func() (net.Conn, error) { return cli.OpenStream(ctx) },
		func() (net.Conn, error) { return srv.AcceptStream(ctx) })
}

func BenchmarkYamuxOpenRequestClose(b *testing.B) {
	cli, srv := yamuxPair(b)
	ctx := context.Background()
	benchRequest(b,
		func() (net.Conn, error) { return cli.OpenStream(ctx) },
		func() (net.Conn, error) { return srv.AcceptStream() })
}

// BenchmarkMuxLatencyUnderBulk measures round trips of 64 bytes on one
// stream while another stream of the same session sends bulk data as fast
// as it can, with frames of 256 KiB and of 1 MiB (what channels uses): a
// frame is written whole, so a bulk frame can hold a small one up. The
// baseline is the same exchange on an idle session. The unix cases run
// over a Unix socket, as channels' same-host sessions do. Metrics: p50-us
// and p99-us of the round trips.
func BenchmarkMuxLatencyUnderBulk(b *testing.B) {
	for _, tc := range []struct {
		name  string
		frame uint32
		bulk  bool
		unix  bool
	}{
		{"idle", 0, false, false},
		{"bulk/frame=256KiB", 256 << 10, true, false},
		{"bulk/frame=1MiB", 1 << 20, true, false},
		{"unix/idle", 0, false, true},
		{"unix/bulk/frame=1MiB", 1 << 20, true, true},
	} {
		b.Run(tc.name, func(b *testing.B) { benchLatencyUnderBulk(b, tc.frame, tc.bulk, tc.unix) })
	}
}

// benchLatencyUnderBulk runs over TCP, or over a Unix socket with the send
// buffer that channels gives a same-host session.
func benchLatencyUnderBulk(b *testing.B, frame uint32, bulk, unix bool) {
	cfg := Config{MaxFrame: frame}
	var cli, srv *Session
	if unix {
		c1, c2 := unixConns(b)
		for _, c := range []net.Conn{c1, c2} {
			require.NoError(b, c.(*net.UnixConn).SetWriteBuffer(4<<20))
		}
		cli, srv = newPair(b, c1, c2, cfg, cfg)
	} else {
		cli, srv = tcpPair(b, cfg)
	}
	pa, pb := openPair(b, cli, srv)
	echoed := make(chan struct{})
	go func() {
		defer close(echoed)
		_, _ = io.Copy(pb, readOnly{pb}) // echo until pa's FIN
		_ = pb.CloseWrite()
	}()
	var flowing chan struct{}
	if bulk {
		ba, bb := openPair(b, cli, srv)
		flowing = make(chan struct{})
		go func() {
			defer close(flowing)
			chunk := make([]byte, 4<<20)
			for {
				if _, err := ba.Write(chunk); err != nil {
					return // reset below
				}
			}
		}()
		go func() { _, _ = bb.WriteTo(io.Discard) }()
		b.Cleanup(func() {
			_ = ba.Reset()
			<-flowing
		})
	}

	msg := make([]byte, 64)
	reply := make([]byte, 64)
	rtts := make([]time.Duration, 0, b.N)
	stop := startTimer(b)
	for range b.N {
		t0 := time.Now()
		if _, err := pa.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(pa, reply); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, time.Since(t0))
	}
	stop()
	_ = pa.CloseWrite()
	<-echoed
	slices.Sort(rtts)
	b.ReportMetric(float64(rtts[len(rtts)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(rtts[len(rtts)*99/100].Microseconds()), "p99-us")
}
