package mux

import (
	"context"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Connections and tools for the tests that put sessions under stress:
// slow readers, stalled readers, small socket buffers, log and memory
// accounting.

// throttledConn paces its Reads at rate bytes per second, in reads of at
// most chunk bytes: a slow link, or a peer that reads slowly. Time spent
// idle earns no credit. The pacing is the link being simulated, not a wait
// for another goroutine.
type throttledConn struct {
	net.Conn
	rate, chunk int
	next        time.Time // when the link is free again
}

func throttle(c net.Conn, rate, chunk int) *throttledConn {
	return &throttledConn{Conn: c, rate: rate, chunk: chunk}
}

// Read is called by one goroutine at a time (the session's reader).
func (c *throttledConn) Read(b []byte) (int, error) {
	if len(b) > c.chunk {
		b = b[:c.chunk]
	}
	n, err := c.Conn.Read(b)
	now := time.Now()
	if c.next.Before(now) {
		c.next = now
	}
	c.next = c.next.Add(time.Duration(float64(n) / float64(c.rate) * float64(time.Second)))
	if d := c.next.Sub(now); d > 0 {
		time.Sleep(d)
	}
	return n, err
}

// gatedConn holds its Reads while the gate is shut: a peer that stops
// reading, and then starts again.
type gatedConn struct {
	net.Conn
	mu     sync.Mutex
	open   chan struct{} // closed while reads may go on
	closed chan struct{}
	once   sync.Once
}

func gate(c net.Conn) *gatedConn {
	g := &gatedConn{Conn: c, open: make(chan struct{}), closed: make(chan struct{})}
	close(g.open)
	return g
}

// shut holds the Reads that start from now on.
func (g *gatedConn) shut() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		g.open = make(chan struct{})
	default:
	}
}

// reopen lets Reads go on.
func (g *gatedConn) reopen() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
	default:
		close(g.open)
	}
}

func (g *gatedConn) Read(b []byte) (int, error) {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	select {
	case <-open:
	case <-g.closed:
		return 0, net.ErrClosed
	}
	return g.Conn.Read(b)
}

func (g *gatedConn) Close() error {
	g.once.Do(func() { close(g.closed) })
	return g.Conn.Close()
}

// smallBuffers gives both ends of a TCP or Unix connection small kernel
// buffers, so that a peer that stops reading stalls the writer soon.
func smallBuffers(t testing.TB, size int, conns ...net.Conn) {
	t.Helper()
	type buffered interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}
	for _, c := range conns {
		b, ok := c.(buffered)
		require.True(t, ok, "%T has no socket buffers", c)
		require.NoError(t, b.SetReadBuffer(size))
		require.NoError(t, b.SetWriteBuffer(size))
	}
}

// countingHandler is a slog.Handler that counts the records it gets.
type countingHandler struct {
	n atomic.Int64
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(context.Context, slog.Record) error {
	h.n.Add(1)
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// heapInUse returns the live heap after two collections (pooled buffers
// survive one).
func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// queueLen returns how many frames wait in s's send queue.
func queueLen(s *Session) int {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return len(s.queue)
}

// queuedPipeFrames returns how many frames with a payload in a pipe wait
// in s's send queue.
func queuedPipeFrames(s *Session) int {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	n := 0
	for _, f := range s.queue {
		if f.pipe != nil {
			n++
		}
	}
	return n
}
