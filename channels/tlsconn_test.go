package channels_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/mux"
)

// tcpConns returns both ends of a TCP connection on loopback.
func tcpConns(t testing.TB) (dialed, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	dialed, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	accepted = <-ch
	require.NotNil(t, accepted)
	t.Cleanup(func() {
		dialed.Close()
		accepted.Close()
	})
	return dialed, accepted
}

// tlsPair returns the two ends of a mutual TLS connection over TCP
// loopback, each tls.Conn over what wrap makes of its TCP connection.
func tlsPair(t testing.TB, wrap func(net.Conn) net.Conn) (client, server *tls.Conn) {
	t.Helper()
	ca, files := writeCerts(t, t.TempDir(), "c", "s")
	cfgs := map[string]*tls.Config{}
	for name, f := range files {
		cr, err := channels.TLSConfigFromFiles(f[0], f[1], ca)
		require.NoError(t, err)
		// The data path is under test, not the peers' identities.
		cfgs[name] = &tls.Config{
			MinVersion:         tls.VersionTLS13,
			Certificates:       []tls.Certificate{*cr.Current().Certificate()},
			InsecureSkipVerify: true,
			ClientAuth:         tls.RequireAnyClientCert,
		}
	}
	raw, sraw := tcpConns(t)
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

// countedTLSPair is tlsPair over record connections, with the writes
// that reach the client's socket counted.
func countedTLSPair(t *testing.T) (client, server *tls.Conn, counter *writeCounter) {
	client, server = tlsPair(t, func(c net.Conn) net.Conn {
		if counter == nil { // the client's, made first
			counter = &writeCounter{Conn: c}
			return channels.NewRecordConn(counter)
		}
		return channels.NewRecordConn(c)
	})
	return client, server, counter
}

// TestTLSSessionConnGathersRecords: the sixteen records of a 256 KiB Write
// reach the socket in one write, and arrive intact.
func TestTLSSessionConnGathersRecords(t *testing.T) {
	client, server, counter := countedTLSPair(t)
	sc := channels.SessionConn(client)
	require.True(t, channels.IsTLSSessionConn(sc))
	msg := randomBytes(t, 256<<10)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		if _, err := io.ReadFull(server, b); err != nil {
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
	client, server := tlsPair(t, channels.NewRecordConn)
	require.True(t, channels.RecordConnReadsRaw(server.NetConn()), "a TCP connection reads through its RawConn")
	msg := randomBytes(t, 200<<10) // 13 records, one write
	_, err := channels.SessionConn(client).Write(msg)
	require.NoError(t, err)
	before, _ := channels.RecordConnReads(server)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(server, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(msg, got), "bytes differ")
	after, holding := channels.RecordConnReads(server)
	require.LessOrEqual(t, after-before, 4, "reads for 13 records")
	require.False(t, holding, "the read-ahead buffer goes back to the pool once drained")
}

// TestTLSSessionConnBothWays moves data both ways at once, in writes of
// every size, and ends each direction with close_notify.
func TestTLSSessionConnBothWays(t *testing.T) {
	client, server := tlsPair(t, channels.NewRecordConn)
	ends := []net.Conn{channels.SessionConn(client), channels.SessionConn(server)}
	data := [][]byte{randomBytes(t, 3<<20), randomBytes(t, 2<<20+12345)}
	var wg sync.WaitGroup
	got := make([][]byte, 2)
	errs := make([]error, 4)
	for i := range ends {
		wg.Go(func() {
			d := data[i]
			for size := 1; len(d) > 0; size = size*3 + 7 {
				k := min(len(d), size%(600<<10)+1)
				if _, err := ends[i].Write(d[:k]); err != nil {
					errs[i] = err
					return
				}
				d = d[k:]
			}
			errs[i] = ends[i].(interface{ CloseWrite() error }).CloseWrite()
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
// os.ErrDeadlineExceeded, as on the socket itself, and no buffer is held
// while waiting.
func TestRecordConnReadDeadline(t *testing.T) {
	_, server := tlsPair(t, channels.NewRecordConn)
	require.NoError(t, server.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
	_, err := server.Read(make([]byte, 10))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	_, holding := channels.RecordConnReads(server)
	require.False(t, holding)
}

// BenchmarkTLSConn is the baseline of BenchmarkTLSSessionConn: crypto/tls
// as it comes, a system call per record both ways, on TCP loopback.
func BenchmarkTLSConn(b *testing.B) {
	client, server := tlsPair(b, func(c net.Conn) net.Conn { return c })
	benchWrite(b, client, drainTo(server))
}

// BenchmarkTLSSessionConn is a session's TLS connection: the records of a
// Write gathered, and read ahead.
func BenchmarkTLSSessionConn(b *testing.B) {
	client, server := tlsPair(b, channels.NewRecordConn)
	benchWrite(b, channels.SessionConn(client).(interface {
		io.Writer
		CloseWrite() error
	}), drainTo(server))
}

// TestTLSSessionGathersBatch: a multiplexer session over a session's TLS
// connection sends a 256 KiB frame's records in one write to the socket,
// not one write per record, and the stream's bytes arrive intact.
func TestTLSSessionGathersBatch(t *testing.T) {
	client, server, counter := countedTLSPair(t)
	cs, err := mux.Client(channels.SessionConn(client), mux.Config{})
	require.NoError(t, err)
	defer cs.Close()
	ss, err := mux.Server(channels.SessionConn(server), mux.Config{})
	require.NoError(t, err)
	defer ss.Close()

	msg := randomBytes(t, 256<<10) // the stream's initial window
	got := make(chan []byte, 1)
	go func() {
		st, err := ss.AcceptStream(context.Background())
		if err != nil {
			got <- nil
			return
		}
		b, _ := io.ReadAll(st)
		got <- b
	}()
	st, err := cs.OpenStream(context.Background())
	require.NoError(t, err)
	before := counter.writes.Load()
	n, err := st.Write(msg)
	require.NoError(t, err)
	require.Equal(t, len(msg), n)
	require.LessOrEqual(t, counter.writes.Load()-before, int64(2), "socket writes for a 256 KiB frame")
	require.NoError(t, st.CloseWrite())
	require.True(t, bytes.Equal(msg, <-got), "bytes differ")
}

// TestTLSSessionConnReachesTheSocket: through a session's TLS connection
// and its record layer, NetConn leads to the TCP socket, whose TCP_INFO
// the session's keepalive and write timeout read (bytes acknowledged,
// retransmissions).
func TestTLSSessionConnReachesTheSocket(t *testing.T) {
	client, _ := tlsPair(t, channels.NewRecordConn)
	var c net.Conn = channels.SessionConn(client)
	for {
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = nc.NetConn()
	}
	require.IsType(t, &net.TCPConn{}, c)
}
