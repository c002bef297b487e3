package mux

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// quiet is a Config whose logger drops everything.
func quiet(c Config) Config {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// tcpConns returns both ends of a 127.0.0.1 TCP connection.
func tcpConns(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	return connectedPair(t, "tcp", "127.0.0.1:0")
}

// unixConns returns both ends of a Unix stream socket connection (with an
// abstract name, which leaves no file behind).
func unixConns(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	return connectedPair(t, "unix", fmt.Sprintf("@mux-test-%d-%d", os.Getpid(), unixSeq.Add(1)))
}

var unixSeq atomic.Int64

// connectedPair listens on addr, dials it, and returns both ends.
func connectedPair(t testing.TB, network, addr string) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	require.NoError(t, err)
	defer ln.Close()
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		ch <- result{c, err}
	}()
	c1, err := net.Dial(network, ln.Addr().String())
	require.NoError(t, err)
	r := <-ch
	require.NoError(t, r.err)
	return c1, r.c
}

// newPair starts a client session on c1 and a server session on c2, both
// closed at the end of the test.
func newPair(t testing.TB, c1, c2 net.Conn, ccfg, scfg Config) (cli, srv *Session) {
	t.Helper()
	cli, err := Client(c1, quiet(ccfg))
	require.NoError(t, err)
	srv, err = Server(c2, quiet(scfg))
	require.NoError(t, err)
	t.Cleanup(func() {
		cli.Close()
		srv.Close()
	})
	return cli, srv
}

func tcpPair(t testing.TB, cfg Config) (cli, srv *Session) {
	c1, c2 := tcpConns(t)
	return newPair(t, c1, c2, cfg, cfg)
}

func unixPair(t testing.TB, cfg Config) (cli, srv *Session) {
	c1, c2 := unixConns(t)
	return newPair(t, c1, c2, cfg, cfg)
}

func pipePair(t testing.TB, cfg Config) (cli, srv *Session) {
	c1, c2 := net.Pipe()
	return newPair(t, c1, c2, cfg, cfg)
}

// ctx returns a context ending with the test, bounded to 10s.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openPair opens a stream on a, establishes it with one byte, and accepts
// it on b.
func openPair(t testing.TB, a, b *Session) (*Stream, *Stream) {
	t.Helper()
	ctx := testCtx(t)
	sa, err := a.OpenStream(ctx)
	require.NoError(t, err)
	_, err = sa.Write([]byte{'!'})
	require.NoError(t, err)
	sb, err := b.AcceptStream(ctx)
	require.NoError(t, err)
	var one [1]byte
	_, err = io.ReadFull(sb, one[:])
	require.NoError(t, err)
	require.Equal(t, byte('!'), one[0])
	return sa, sb
}

// openPairQuiet is openPair for callers that cannot fail a test: nil if
// anything fails.
func openPairQuiet(a, b *Session) (*Stream, *Stream) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := a.OpenStream(ctx)
	if err != nil {
		return nil, nil
	}
	if _, err := sa.Write([]byte{'!'}); err != nil {
		return nil, nil
	}
	sb, err := b.AcceptStream(ctx)
	if err != nil {
		return nil, nil
	}
	if _, err := io.ReadFull(sb, make([]byte, 1)); err != nil {
		return nil, nil
	}
	return sa, sb
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// readOnly hides a Stream's WriteTo, so that io.Copy uses Read.
type readOnly struct{ r io.Reader }

func (r readOnly) Read(b []byte) (int, error) { return r.r.Read(b) }

// countingConn counts the Write calls on a connection, records what is
// written, and can hold writes at a gate.
type countingConn struct {
	net.Conn
	writes atomic.Int64

	mu      sync.Mutex
	record  bool
	written []byte
	gate    chan struct{} // non-nil: Write waits for it to close
	held    chan struct{} // closed when a Write waits at the gate
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	gate, held := c.gate, c.held
	c.gate, c.held = nil, nil
	if c.record {
		c.written = append(c.written, b...)
	}
	c.mu.Unlock()
	if gate != nil {
		close(held)
		<-gate
	}
	c.writes.Add(1)
	return c.Conn.Write(b)
}

// hold makes the next Write wait until the returned release is called;
// held is closed once a Write waits.
func (c *countingConn) hold() (held <-chan struct{}, release func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	gate, h := make(chan struct{}), make(chan struct{})
	c.gate, c.held = gate, h
	return h, sync.OnceFunc(func() { close(gate) })
}

// parseFrames decodes a recorded byte stream into headers.
func parseFrames(t testing.TB, b []byte) []header {
	t.Helper()
	var hs []header
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), headerSize)
		h := decodeHeader(b)
		b = b[headerSize:]
		if h.typ == typeData {
			require.GreaterOrEqual(t, len(b), int(h.length))
			b = b[h.length:]
		}
		hs = append(hs, h)
	}
	return hs
}

// frameBytes encodes a frame for a raw peer.
func frameBytes(typ uint8, flags uint16, id, length uint32, payload []byte) []byte {
	b := make([]byte, headerSize, headerSize+len(payload))
	header{typ: typ, flags: flags, id: id, length: length}.encode(b)
	return append(b, payload...)
}

// streamState returns st's window and buffer accounting.
func streamState(st *Stream) (sendWin, recvWin, buffered uint32) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.sendWin, st.recvWin, st.buffered
}

// queuedWrites returns how many Writes wait in s's send queue.
func queuedWrites(s *Session) int {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	n := 0
	for _, f := range s.queue {
		if f.typ == typeData && len(f.payload()) > 0 {
			n++
		}
	}
	return n
}

// stuck reports whether st's Write is being written to the connection of
// s and is held there (the peer does not read): what is written next
// queues, and waits for it. A Write that the writer has not taken yet is
// not stuck: the writer's next batch would take it with what is written
// next.
func stuck(s *Session, st *Stream) bool {
	sendWin, _, _ := streamState(st)
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for _, f := range s.queue {
		if f.owner == st {
			return false
		}
	}
	return sendWin < initialWindow && s.owned
}

// sendAll writes data to w, then half-closes it.
func sendAll(w interface {
	io.Writer
	CloseWrite() error
}, data []byte) error {
	if _, err := w.Write(data); err != nil {
		return err
	}
	return w.CloseWrite()
}

// stalled reports whether st's sender waits for window.
func stalled(st *Stream) bool {
	sendWin, _, _ := streamState(st)
	return sendWin == 0
}

// writeToResult is what a WriteTo returned.
type writeToResult struct {
	n   int64
	err error
}

// startWriteTo runs st.WriteTo(w) on a goroutine of its own.
func startWriteTo(st *Stream, w io.Writer) <-chan writeToResult {
	done := make(chan writeToResult, 1)
	go func() {
		n, err := st.WriteTo(w)
		done <- writeToResult{n, err}
	}()
	return done
}

// gatedPair returns a session pair over TCP with 16 KiB socket buffers,
// the client configured with ccfg, and the gate on the server's reads: a
// peer that stops reading, and starts again.
func gatedPair(t testing.TB, ccfg Config) (cli, srv *Session, g *gatedConn) {
	t.Helper()
	c1, c2 := tcpConns(t)
	smallBuffers(t, 16<<10, c1, c2)
	g = gate(c2)
	cli, srv = newPair(t, c1, g, ccfg, Config{})
	return cli, srv, g
}
