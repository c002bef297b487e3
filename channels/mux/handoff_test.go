package mux

import (
	"bytes"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// idle reports whether s's connection is free for a direct write: no
// write in progress, nothing queued.
func idle(s *Session) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return !s.owned && len(s.queue) == 0
}

// A Write, small or large, that finds the connection idle writes its
// frame itself, and its bytes arrive as written; with another write in
// progress (here: another stream's, held at the connection), a Write goes
// through the writer goroutine after it, in order.
func TestDirectWrite(t *testing.T) {
	c1, c2 := tcpConns(t)
	cc := &countingConn{Conn: c1}
	cli, srv := newPair(t, cc, c2, Config{}, Config{})
	require.Eventually(t, func() bool { return cli.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	sa, sb := openPair(t, cli, srv)
	other, otherPeer := openPair(t, cli, srv)

	for _, size := range []int{100, 64 << 10} { // copied if queued; within the initial window
		data := randomBytes(t, size)
		require.Eventually(t, func() bool { return idle(cli) }, 5*time.Second, time.Millisecond)
		before := cli.directWrites.Load()
		n, err := sa.Write(data)
		require.NoError(t, err)
		require.Equal(t, len(data), n)
		require.Equal(t, before+1, cli.directWrites.Load(), "a %d-byte Write did not write its frame itself", size)
		got := make([]byte, len(data))
		_, err = io.ReadFull(sb, got)
		require.NoError(t, err)
		require.True(t, bytes.Equal(data, got))
	}

	// other's Write has the connection, held: sa's Write queues behind.
	data := randomBytes(t, 64<<10)
	require.Eventually(t, func() bool { return idle(cli) }, 5*time.Second, time.Millisecond)
	before := cli.directWrites.Load()
	held, release := cc.hold()
	go func() { _, _ = other.Write([]byte("first")) }()
	<-held
	written := make(chan error, 1)
	go func() {
		_, err := sa.Write(data)
		written <- err
	}()
	require.Eventually(t, func() bool { return queuedWrites(cli) == 1 }, 5*time.Second, time.Millisecond)
	release()
	require.NoError(t, <-written)
	require.Eventually(t, func() bool { return idle(cli) }, 5*time.Second, time.Millisecond)
	require.Equal(t, before+1, cli.directWrites.Load(), "only other's Write should have written itself")
	got := make([]byte, len(data))
	_, err := io.ReadFull(sb, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got))
	first := make([]byte, len("first"))
	_, err = io.ReadFull(otherPeer, first)
	require.NoError(t, err)
	require.Equal(t, "first", string(first))
}

// A direct write that the peer does not take within WriteTimeout ends the
// session as the writer's own write would: the Write fails with a reset,
// and the session with the timeout.
func TestDirectWriteTimeout(t *testing.T) {
	c1, c2 := tcpConns(t)
	defer c2.Close() // never read
	require.NoError(t, c1.(*net.TCPConn).SetWriteBuffer(4<<10))
	require.NoError(t, c2.(*net.TCPConn).SetReadBuffer(4<<10))
	s, err := Client(c1, quiet(Config{WriteTimeout: 50 * time.Millisecond}))
	require.NoError(t, err)
	defer s.Close()
	st, err := s.OpenStream(testCtx(t))
	require.NoError(t, err)
	_, err = st.Write([]byte("syn")) // the first frame goes through the writer
	require.NoError(t, err)
	require.Eventually(t, func() bool { return idle(s) }, 5*time.Second, time.Millisecond)

	_, err = st.Write(make([]byte, 128<<10)) // more than the socket buffers hold
	requireReset(t, err)
	require.NotErrorIs(t, err, os.ErrDeadlineExceeded)
	require.Equal(t, uint64(1), s.directWrites.Load())
	<-s.CloseChan()
	require.ErrorIs(t, s.Err(), os.ErrDeadlineExceeded)
}
