package channels_test

import (
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

// benchChunk is the size of one Write; b.SetBytes makes the figures MB/s.
const benchChunk = 128 << 10

// benchWrite writes b.N chunks to w, half-closes it, and waits for the
// reader to have consumed everything. Besides MB/s it reports cpu-s/GiB,
// the CPU time of the whole process (both ends, and the kernel's work for
// them) per GiB moved, steadier than wall time on a shared machine.
func benchWrite(b *testing.B, w interface {
	io.Writer
	CloseWrite() error
}, readDone <-chan error) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	cpu0 := processCPU(b)
	b.ResetTimer()
	for range b.N {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, w.CloseWrite())
	require.NoError(b, <-readDone)
	b.StopTimer()
	gib := float64(b.N) * benchChunk / (1 << 30)
	b.ReportMetric((processCPU(b)-cpu0).Seconds()/gib, "cpu-s/GiB")
}

// processCPU is the CPU time (user and system) the process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func drainTo(r io.Reader) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, r)
		done <- err
	}()
	return done
}

// BenchmarkStreamThroughput measures one stream over a session on TCP
// loopback; compare with BenchmarkDirectTCPThroughput.
func BenchmarkStreamThroughput(b *testing.B) {
	req, reply, _, _ := pair(b, nil, nil)
	s, in := open(b, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	benchWrite(b, s, drainTo(in.Stream))
}

// BenchmarkStreamThroughputTCP is BenchmarkStreamThroughput over TCP
// rather than the same-host socket, as between hosts.
func BenchmarkStreamThroughputTCP(b *testing.B) {
	req, reply, _, _ := pair(b, channels.PlainTCPTransport(), nil)
	s, in := open(b, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	benchWrite(b, s, drainTo(in.Stream))
}

// BenchmarkStreamThroughputTLS is BenchmarkStreamThroughput over mutual TLS.
func BenchmarkStreamThroughputTLS(b *testing.B) {
	ca, files := writeCerts(b, b.TempDir(), "a", "b")
	req, reply, _, _ := pair(b, channels.PlainTCPTransport(), useCerts(b, ca, files))
	s, in := open(b, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	benchWrite(b, s, drainTo(in.Stream))
}

// BenchmarkDirectTCPThroughput is the baseline: a plain TCP connection on
// loopback with the same writes.
func BenchmarkDirectTCPThroughput(b *testing.B) {
	c, server := tcpConns(b)
	benchWrite(b, c.(*net.TCPConn), drainTo(server))
}
