package mux

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestConcurrentStreamsTCP moves 1 MiB each way on 100 streams at once
// over TCP and compares what arrives with what was sent.
func TestConcurrentStreamsTCP(t *testing.T) {
	const (
		streams = 100
		size    = 1 << 20
		stride  = 8 << 10
	)
	cli, srv := tcpPair(t, Config{})
	ctx := testCtx(t)
	pool := randomBytes(t, 2*size+2*streams*stride)
	// Stream i sends up[i] and receives down[i]: all distinct.
	up := func(i int) []byte { return pool[i*stride : i*stride+size] }
	down := func(i int) []byte { return pool[size+i*stride : size+i*stride+size] }
	sum := func(b []byte) [32]byte { return sha256.Sum256(b) }

	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // server: read with Read, write concurrently
		defer wg.Done()
		for range streams {
			st, err := srv.AcceptStream(ctx)
			if !assert.NoError(t, err) {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer st.Close()
				var idx [4]byte
				if _, err := io.ReadFull(st, idx[:]); !assert.NoError(t, err) {
					return
				}
				i := int(binary.BigEndian.Uint32(idx[:]))
				done := make(chan struct{})
				go func() {
					defer close(done)
					_, err := st.Write(down(i))
					assert.NoError(t, err)
					assert.NoError(t, st.CloseWrite())
				}()
				h := sha256.New()
				_, err := io.Copy(h, readOnly{st})
				assert.NoError(t, err)
				assert.Equal(t, sum(up(i)), [32]byte(h.Sum(nil)), "stream %d upload", i)
				<-done
			}()
		}
	}()
	for i := range streams {
		wg.Add(1)
		go func() { // client: read with WriteTo
			defer wg.Done()
			st, err := cli.OpenStream(ctx)
			if !assert.NoError(t, err) {
				return
			}
			defer st.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				var idx [4]byte
				binary.BigEndian.PutUint32(idx[:], uint32(i))
				_, err := st.Write(append(idx[:], up(i)...))
				assert.NoError(t, err)
				assert.NoError(t, st.CloseWrite())
			}()
			h := sha256.New()
			n, err := st.WriteTo(h)
			assert.NoError(t, err)
			assert.EqualValues(t, size, n)
			assert.Equal(t, sum(down(i)), [32]byte(h.Sum(nil)), "stream %d download", i)
			<-done
		}()
	}
	wg.Wait()
	require.Eventually(t, func() bool { return cli.NumStreams() == 0 && srv.NumStreams() == 0 },
		5*time.Second, time.Millisecond)
}

func TestHalfClose(t *testing.T) {
	a, b := pipePair(t, Config{})
	sa, sb := openPair(t, a, b)

	_, err := sa.Write([]byte("request"))
	require.NoError(t, err)
	require.NoError(t, sa.CloseWrite())
	require.NoError(t, sa.CloseWrite(), "idempotent")
	_, err = sa.Write([]byte("x"))
	require.ErrorIs(t, err, ErrWriteAfterClose)
	require.ErrorIs(t, err, net.ErrClosed)

	got, err := io.ReadAll(sb)
	require.NoError(t, err)
	require.Equal(t, "request", string(got))
	n, err := sb.Read(make([]byte, 1))
	require.Equal(t, 0, n)
	require.Equal(t, io.EOF, err, "EOF sticks")

	// B keeps writing after A's FIN.
	for range 3 {
		_, err = sb.Write([]byte("reply;"))
		require.NoError(t, err)
	}
	buf := make([]byte, 18)
	_, err = io.ReadFull(sa, buf)
	require.NoError(t, err)
	require.Equal(t, "reply;reply;reply;", string(buf))
	require.NoError(t, sb.CloseWrite())
	_, err = sa.Read(buf)
	require.Equal(t, io.EOF, err)

	require.Eventually(t, func() bool { return a.NumStreams() == 0 && b.NumStreams() == 0 },
		5*time.Second, time.Millisecond, "both FINs end the stream")
	require.NoError(t, sa.Close())
	require.NoError(t, sb.Close())
}

// fillWindow writes to st until its send window is exhausted; the write
// goes on in the background and its result arrives on the channel.
func fillWindow(t *testing.T, st *Stream, size int) <-chan error {
	t.Helper()
	ch := make(chan error, 1)
	go func() {
		_, err := st.Write(make([]byte, size))
		ch <- err
	}()
	require.Eventually(t, func() bool { w, _, _ := streamState(st); return w == 0 }, 5*time.Second, time.Millisecond)
	return ch
}

func requireReset(t *testing.T, err error) {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, ErrStreamReset)
	require.NotErrorIs(t, err, io.EOF)
}

func TestReset(t *testing.T) {
	for _, tc := range []struct {
		name     string
		resetter func(opener, acceptor *Stream) (resetter, other *Stream)
	}{
		{"by opener", func(o, a *Stream) (*Stream, *Stream) { return o, a }},
		{"by acceptor", func(o, a *Stream) (*Stream, *Stream) { return a, o }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := tcpPair(t, Config{})
			so, sa := openPair(t, a, b)
			r, other := tc.resetter(so, sa)

			readErr := make(chan error, 1)
			go func() {
				_, err := other.Read(make([]byte, 10))
				readErr <- err
			}()
			writeErr := fillWindow(t, other, 4*initialWindow)

			require.NoError(t, r.Reset())
			require.NoError(t, r.Reset(), "idempotent")
			requireReset(t, <-readErr)
			requireReset(t, <-writeErr)
			_, err := r.Read(make([]byte, 10))
			requireReset(t, err) // the data it had buffered is dropped
			_, err = r.Write([]byte("x"))
			requireReset(t, err)
			_, err = other.Write([]byte("x"))
			requireReset(t, err)
			_, err = other.WriteTo(io.Discard)
			requireReset(t, err)
			require.NoError(t, other.Close())
			require.Eventually(t, func() bool { return a.NumStreams() == 0 && b.NumStreams() == 0 },
				5*time.Second, time.Millisecond)
		})
	}
}

// TestResetUnblocksLocal: Reset ends pending operations on its own stream.
func TestResetUnblocksLocal(t *testing.T) {
	a, b := tcpPair(t, Config{})
	sa, _ := openPair(t, a, b)
	readErr := make(chan error, 1)
	go func() {
		_, err := sa.Read(make([]byte, 1))
		readErr <- err
	}()
	writeErr := fillWindow(t, sa, 4*initialWindow)
	require.NoError(t, sa.Reset())
	requireReset(t, <-readErr)
	requireReset(t, <-writeErr)
}

func TestResetBeforeFirstFrame(t *testing.T) {
	a, _ := pipePair(t, Config{})
	st, err := a.OpenStream(testCtx(t))
	require.NoError(t, err)
	require.Equal(t, 1, a.NumStreams())
	require.NoError(t, st.Reset())
	require.Equal(t, 0, a.NumStreams())
	_, err = st.Read(make([]byte, 1))
	requireReset(t, err)
}

func TestDeadlines(t *testing.T) {
	a, b := tcpPair(t, Config{})
	sa, sb := openPair(t, a, b)

	t.Run("read", func(t *testing.T) {
		start := time.Now()
		require.NoError(t, sb.SetReadDeadline(start.Add(20*time.Millisecond)))
		_, err := sb.Read(make([]byte, 1))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		require.True(t, ne.Timeout())
		require.NotErrorIs(t, err, io.EOF)
		require.GreaterOrEqual(t, time.Since(start), 20*time.Millisecond)
		_, err = sb.WriteTo(io.Discard)
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)

		// Extended, it works again.
		require.NoError(t, sb.SetReadDeadline(time.Now().Add(time.Minute)))
		_, err = sa.Write([]byte("hi"))
		require.NoError(t, err)
		buf := make([]byte, 2)
		_, err = io.ReadFull(sb, buf)
		require.NoError(t, err)
		require.Equal(t, "hi", string(buf))
	})

	t.Run("extend while blocked", func(t *testing.T) {
		require.NoError(t, sb.SetReadDeadline(time.Now().Add(time.Hour)))
		done := make(chan error, 1)
		go func() {
			_, err := sb.Read(make([]byte, 1))
			done <- err
		}()
		require.NoError(t, sb.SetReadDeadline(time.Now().Add(-time.Second)))
		require.ErrorIs(t, <-done, os.ErrDeadlineExceeded)
		require.NoError(t, sb.SetReadDeadline(time.Time{}))
	})

	t.Run("write", func(t *testing.T) {
		// sb does not read: sa's Write stops at the window and times out.
		data := randomBytes(t, 3*initialWindow)
		window, _, _ := streamState(sa)
		require.NoError(t, sa.SetWriteDeadline(time.Now().Add(50*time.Millisecond)))
		n, err := sa.Write(data)
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		require.Equal(t, int(window), n)

		// Extended, the rest goes through, exactly once.
		require.NoError(t, sa.SetWriteDeadline(time.Time{}))
		done := make(chan error, 1)
		go func() {
			_, err := sa.Write(data[n:])
			done <- err
		}()
		got := make([]byte, len(data))
		_, err = io.ReadFull(sb, got)
		require.NoError(t, err)
		require.NoError(t, <-done)
		require.True(t, bytes.Equal(data, got))
	})

	t.Run("write past deadline", func(t *testing.T) {
		require.NoError(t, sa.SetDeadline(time.Now().Add(-time.Second)))
		_, err := sa.Write([]byte("x"))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		require.NoError(t, sa.SetDeadline(time.Time{}))
		_, err = sa.Write([]byte("x"))
		require.NoError(t, err)
	})
}

// TestFlowControl: a stream whose reader does not read stalls its writer
// at the window, and no more is buffered, while another stream flows.
func TestFlowControl(t *testing.T) {
	a, b := tcpPair(t, Config{})
	stalled, stalledPeer := openPair(t, a, b)
	writeErr := fillWindow(t, stalled, 4<<20)
	require.Eventually(t, func() bool { _, _, buf := streamState(stalledPeer); return buf == initialWindow-1 },
		5*time.Second, time.Millisecond) // openPair read one byte

	flowing, flowingPeer := openPair(t, a, b)
	data := randomBytes(t, 4<<20)
	go func() {
		_, err := flowing.Write(data)
		assert.NoError(t, err)
		assert.NoError(t, flowing.CloseWrite())
	}()
	got, err := io.ReadAll(flowingPeer)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got))

	select {
	case err := <-writeErr:
		t.Fatalf("stalled Write returned: %v", err)
	default:
	}
	_, recvWin, buffered := streamState(stalledPeer)
	require.Equal(t, uint32(initialWindow), recvWin)
	require.LessOrEqual(t, buffered, recvWin)

	// Reading drains it.
	go func() { _, _ = io.Copy(io.Discard, stalledPeer) }()
	require.NoError(t, <-writeErr)
	require.NoError(t, stalled.Close())
}

// TestWindowGrowth: a bulk stream's window grows beyond the initial one,
// up to MaxStreamWindow and no further.
func TestWindowGrowth(t *testing.T) {
	const maxWin = 1 << 20
	a, b := tcpPair(t, Config{MaxStreamWindow: maxWin})
	// The first ping's RTT is real but tiny on loopback; a large one makes
	// every update count as fast, so the test does not depend on timing.
	require.Eventually(t, func() bool { return b.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	b.rtt.Store(int64(time.Second))

	sa, sb := openPair(t, a, b)
	go func() {
		_, err := sa.Write(make([]byte, 16<<20))
		assert.NoError(t, err)
		assert.NoError(t, sa.CloseWrite())
	}()
	var maxBuffered uint32
	buf := make([]byte, 32<<10)
	for {
		_, _, buffered := streamState(sb)
		maxBuffered = max(maxBuffered, buffered)
		_, err := sb.Read(buf)
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
	}
	_, recvWin, _ := streamState(sb)
	require.Equal(t, uint32(maxWin), recvWin)
	require.LessOrEqual(t, maxBuffered, uint32(maxWin))
	require.Greater(t, maxBuffered, uint32(initialWindow), "the sender used the grown window")
}

// TestSlowReaderWindow: a reader slower than a round trip per half window
// keeps the initial window.
func TestSlowReaderWindow(t *testing.T) {
	a, b := tcpPair(t, Config{})
	require.Eventually(t, func() bool { return b.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	b.rtt.Store(1) // 1ns: no reader is that fast
	sa, sb := openPair(t, a, b)
	go func() {
		_, err := sa.Write(make([]byte, 4<<20))
		assert.NoError(t, err)
		assert.NoError(t, sa.CloseWrite())
	}()
	_, err := io.Copy(io.Discard, sb)
	require.NoError(t, err)
	_, recvWin, _ := streamState(sb)
	require.Equal(t, uint32(initialWindow), recvWin)
}

func TestZeroLengthReadWaits(t *testing.T) {
	a, b := pipePair(t, Config{})
	sa, sb := openPair(t, a, b)
	done := make(chan error, 1)
	go func() {
		_, err := sb.Read(nil)
		done <- err
	}()
	_, err := sa.Write([]byte("data"))
	require.NoError(t, err)
	require.NoError(t, <-done)
	buf := make([]byte, 4)
	_, err = io.ReadFull(sb, buf)
	require.NoError(t, err)
	require.NoError(t, sa.CloseWrite())
	_, err = sb.Read(nil)
	require.Equal(t, io.EOF, err)
}

// TestCloseDiscardsAndCredits: after Close, data still arriving is dropped
// but credited, so the peer's writer completes.
func TestCloseDiscardsAndCredits(t *testing.T) {
	a, b := tcpPair(t, Config{})
	sa, sb := openPair(t, a, b)
	writeErr := fillWindow(t, sa, 4<<20)
	require.NoError(t, sb.Close())
	require.NoError(t, sb.Close(), "idempotent")
	require.NoError(t, <-writeErr)
	_, err := sb.Read(make([]byte, 1))
	require.ErrorIs(t, err, net.ErrClosed)
	require.NotErrorIs(t, err, io.EOF)
	_, err = sb.Write([]byte("x"))
	require.ErrorIs(t, err, ErrWriteAfterClose)
	_, err = sa.Read(make([]byte, 1))
	require.Equal(t, io.EOF, err, "Close sent FIN")
	require.NoError(t, sa.CloseWrite())
	require.Eventually(t, func() bool { return a.NumStreams() == 0 && b.NumStreams() == 0 },
		5*time.Second, time.Millisecond)
}

// TestCloseUnblocks: Close ends a pending Read on the same stream.
func TestCloseUnblocks(t *testing.T) {
	a, b := pipePair(t, Config{})
	sa, _ := openPair(t, a, b)
	done := make(chan error, 1)
	go func() {
		_, err := sa.Read(make([]byte, 1))
		done <- err
	}()
	require.NoError(t, sa.Close())
	err := <-done
	require.ErrorIs(t, err, net.ErrClosed)
	require.NotErrorIs(t, err, io.EOF)
}

func TestWriteToWriterError(t *testing.T) {
	a, b := pipePair(t, Config{})
	sa, sb := openPair(t, a, b)
	_, err := sa.Write([]byte("data"))
	require.NoError(t, err)
	boom := errors.New("boom")
	_, err = sb.WriteTo(failWriter{boom})
	require.ErrorIs(t, err, boom)
}

type failWriter struct{ err error }

func (w failWriter) Write([]byte) (int, error) { return 0, w.err }

// TestSmallWriteCopies: a small Write returns before the writer sends it,
// so it must have copied the data: the caller may reuse its buffer at
// once, and what arrives is what was written.
func TestSmallWriteCopies(t *testing.T) {
	c1, c2 := tcpConns(t)
	cli, srv := newPair(t, c1, c2, Config{}, Config{})
	st, peer := openPair(t, cli, srv)
	buf := make([]byte, smallWrite)
	var want []byte
	for i := range 50 {
		for j := range buf {
			buf[j] = byte(i + j)
		}
		want = append(want, buf...)
		n, err := st.Write(buf)
		require.NoError(t, err)
		require.Equal(t, len(buf), n)
	}
	require.NoError(t, st.CloseWrite())
	got, err := io.ReadAll(peer)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "got %d bytes, want %d", len(got), len(want))
}

// TestAwaitReset: after the peer's FIN, AwaitReset reports the peer's
// later reset, or the session's end, at once; it returns nil once the
// stream's own write side is done or its read deadline passes.
func TestAwaitReset(t *testing.T) {
	halfClosed := func(t *testing.T) (a, b *Session, sa, sb *Stream) {
		a, b = tcpPair(t, Config{})
		sa, sb = openPair(t, a, b)
		require.NoError(t, sa.CloseWrite())
		_, err := io.ReadAll(sb)
		require.NoError(t, err, "B reads A's FIN")
		return a, b, sa, sb
	}
	await := func(st *Stream) <-chan error {
		ch := make(chan error, 1)
		go func() { ch <- st.AwaitReset() }()
		return ch
	}
	result := func(t *testing.T, ch <-chan error) error {
		select {
		case err := <-ch:
			return err
		case <-time.After(10 * time.Second):
			require.FailNow(t, "AwaitReset did not return")
			return nil
		}
	}

	t.Run("peer reset", func(t *testing.T) {
		_, _, sa, sb := halfClosed(t)
		ch := await(sb)
		require.NoError(t, sa.Reset())
		require.ErrorIs(t, result(t, ch), ErrStreamReset)
	})
	t.Run("session end", func(t *testing.T) {
		a, _, _, sb := halfClosed(t)
		ch := await(sb)
		require.NoError(t, a.Close())
		require.ErrorIs(t, result(t, ch), ErrStreamReset)
	})
	t.Run("read deadline", func(t *testing.T) {
		_, _, _, sb := halfClosed(t)
		ch := await(sb)
		require.NoError(t, sb.SetReadDeadline(time.Now()))
		require.NoError(t, result(t, ch))
	})
	t.Run("own FIN", func(t *testing.T) {
		_, _, _, sb := halfClosed(t)
		ch := await(sb)
		// The FIN comes while AwaitReset waits, as in a relay whose other
		// direction ends later.
		require.Eventually(t, func() bool { return waitingIn("(*Stream).AwaitReset") }, 5*time.Second, time.Millisecond)
		require.NoError(t, sb.CloseWrite())
		require.NoError(t, result(t, ch))
	})
	t.Run("closed", func(t *testing.T) {
		_, _, _, sb := halfClosed(t)
		ch := await(sb)
		require.NoError(t, sb.Close())
		require.NoError(t, result(t, ch))
	})
}

// waitingIn reports whether a goroutine waits (Stream.waitLocked) inside
// the function fn.
func waitingIn(fn string) bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, fn) && strings.Contains(g, "(*Stream).waitLocked") {
			return true
		}
	}
	return false
}
