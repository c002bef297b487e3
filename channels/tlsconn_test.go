package channels

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// tlsPair returns the two ends of a mutual TLS connection over TCP
// loopback, each tls.Conn over what wrap makes of its TCP connection.
func tlsPair(t testing.TB, wrap func(net.Conn) net.Conn) (client, server *tls.Conn) {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.NewCA("test CA", time.Hour)
	require.NoError(t, err)
	require.NoError(t, ca.Save(dir))
	cfgs := map[string]*tls.Config{}
	for _, iid := range []string{"c", "s"} {
		cert, key, err := ca.WriteInstance(dir, pki.Identity{IID: iid, Role: "test"}, nil, time.Hour)
		require.NoError(t, err)
		cfgs[iid], err = TLSConfigFromFiles(cert, key, filepath.Join(dir, "ca.pem"))
		require.NoError(t, err)
	}
	cfgs["c"].InsecureSkipVerify = true // no host name; the chain is checked by the server side here
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	sraw := <-accepted
	require.NotNil(t, sraw)
	client, server = tls.Client(wrap(raw), cfgs["c"]), tls.Server(wrap(sraw), cfgs["s"])
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	require.NoError(t, client.Handshake())
	require.NoError(t, <-errc)
	return client, server
}

// writeCounter counts the writes that reach a connection.
type writeCounter struct {
	net.Conn
	writes atomic.Int64
}

func (w *writeCounter) Write(p []byte) (int, error) {
	w.writes.Add(1)
	return w.Conn.Write(p)
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// TestTLSSessionConnGathersRecords: the sixteen records of a 256 KiB Write
// reach the socket in one write, and arrive intact.
func TestTLSSessionConnGathersRecords(t *testing.T) {
	var counter *writeCounter
	client, server := tlsPair(t, func(c net.Conn) net.Conn {
		if counter == nil {
			counter = &writeCounter{Conn: c}
			return newRecordConn(counter)
		}
		return newRecordConn(c)
	})
	sc := sessionConn(client)
	require.IsType(t, &tlsSessionConn{}, sc)
	msg := randomBytes(t, 256<<10)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		_, err := io.ReadFull(server, b)
		if err != nil {
			b = nil
		}
		got <- b
	}()
	before := counter.writes.Load()
	n, err := sc.Write(msg)
	require.NoError(t, err)
	require.Equal(t, len(msg), n)
	require.Equal(t, int64(1), counter.writes.Load()-before, "writes for one 256 KiB Write")
	require.True(t, bytes.Equal(msg, <-got), "bytes differ")

	// Writes outside a session Write (alerts, here close_notify) go out
	// at once.
	before = counter.writes.Load()
	require.NoError(t, client.CloseWrite())
	require.Equal(t, int64(1), counter.writes.Load()-before)
	_, err = server.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
}

// TestRecordConnReadsAhead: records that wait in the socket are read with
// one read(2) for many of them.
func TestRecordConnReadsAhead(t *testing.T) {
	var reader *recordConn
	client, server := tlsPair(t, func(c net.Conn) net.Conn {
		rc := newRecordConn(c)
		reader = rc // the server's, made last
		return rc
	})
	require.NotNil(t, reader.rc, "a TCP connection reads through its RawConn")
	msg := randomBytes(t, 200<<10) // 13 records, one write
	_, err := sessionConn(client).Write(msg)
	require.NoError(t, err)
	before := reader.readCalls
	got := make([]byte, len(msg))
	_, err = io.ReadFull(server, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(msg, got), "bytes differ")
	require.LessOrEqual(t, reader.readCalls-before, 4, "read(2)s for 13 records")
	require.Nil(t, reader.buf, "the read-ahead buffer goes back to the pool once drained")
}

// TestTLSSessionConnBothWays moves data both ways at once, in writes of
// every size, and ends each direction with close_notify.
func TestTLSSessionConnBothWays(t *testing.T) {
	client, server := tlsPair(t, func(c net.Conn) net.Conn { return newRecordConn(c) })
	ends := []net.Conn{sessionConn(client), sessionConn(server)}
	data := [][]byte{randomBytes(t, 3<<20), randomBytes(t, 2<<20+12345)}
	var wg sync.WaitGroup
	got := make([][]byte, 2)
	errs := make([]error, 4)
	for i := range ends {
		wg.Go(func() {
			w := ends[i]
			d := data[i]
			for size := 1; len(d) > 0; size = size*3 + 7 {
				k := min(len(d), size%(600<<10)+1)
				if _, err := w.Write(d[:k]); err != nil {
					errs[i] = err
					return
				}
				d = d[k:]
			}
			errs[i] = w.(*tlsSessionConn).CloseWrite()
		})
		wg.Go(func() {
			var b bytes.Buffer
			_, errs[2+i] = io.Copy(&b, ends[1-i]) // what ends[i] wrote
			got[i] = b.Bytes()
		})
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	for i := range data {
		require.Equal(t, len(data[i]), len(got[i]))
		require.True(t, bytes.Equal(data[i], got[i]), "direction %d: bytes differ", i)
	}
}

// TestRecordConnReadDeadline: a read deadline ends a read that waits with
// os.ErrDeadlineExceeded, as on the socket itself, and the buffer is not
// held while waiting.
func TestRecordConnReadDeadline(t *testing.T) {
	_, server := tlsPair(t, func(c net.Conn) net.Conn { return newRecordConn(c) })
	require.NoError(t, server.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
	_, err := server.Read(make([]byte, 10))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	rc := server.NetConn().(*recordConn)
	require.Nil(t, rc.buf)
}

// benchTLS moves b.N chunks of 256 KiB (the proxy's buffer) over a TLS
// connection on TCP loopback, written through write and read by the other
// end; it reports cpu-s/GiB, the process's CPU time per GiB.
func benchTLS(b *testing.B, wrap func(net.Conn) net.Conn, write func(*tls.Conn) net.Conn) {
	client, server := tlsPair(b, wrap)
	w := write(client)
	chunk := make([]byte, 256<<10)
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, server)
		done <- err
	}()
	b.SetBytes(int64(len(chunk)))
	cpu0 := processCPU(b)
	b.ResetTimer()
	for range b.N {
		if _, err := w.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, client.CloseWrite())
	require.NoError(b, <-done)
	b.StopTimer()
	gib := float64(b.N) * float64(len(chunk)) / (1 << 30)
	b.ReportMetric((processCPU(b)-cpu0).Seconds()/gib, "cpu-s/GiB")
}

// BenchmarkTLSConn is the baseline: crypto/tls as it comes, a system call
// per record both ways.
func BenchmarkTLSConn(b *testing.B) {
	benchTLS(b, func(c net.Conn) net.Conn { return c }, func(c *tls.Conn) net.Conn { return c })
}

// BenchmarkTLSSessionConn is a session's TLS connection: records gathered
// per Write and read ahead.
func BenchmarkTLSSessionConn(b *testing.B) {
	benchTLS(b, func(c net.Conn) net.Conn { return newRecordConn(c) }, func(c *tls.Conn) net.Conn { return sessionConn(c) })
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
