//go:build linux

package mux

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// sock is a legacy TCP socket that counts the bytes spliced to or from it.
type sock struct {
	*net.TCPConn
	spliced atomic.Int64
}

func (s *sock) Spliced(n int) { s.spliced.Add(int64(n)) }

// legacyPair returns both ends of a TCP connection: the proxy's end, which
// splices, and the legacy program's.
func legacyPair(t testing.TB) (*sock, *net.TCPConn) {
	c1, c2 := tcpConns(t)
	t.Cleanup(func() {
		c1.Close()
		c2.Close()
	})
	return &sock{TCPConn: c1.(*net.TCPConn)}, c2.(*net.TCPConn)
}

// pump forwards src to st as the proxy does: the first bytes of a burst
// by Read, the rest by SpliceFrom, or by Read alone once SpliceFrom says
// ErrNoSplice; src's EOF becomes CloseWrite.
func pump(st *Stream, src *sock) error {
	buf := make([]byte, smallWrite)
	splice := true
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := st.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if splice && err == nil && n == len(buf) {
			_, err = st.SpliceFrom(src)
			if errors.Is(err, ErrNoSplice) {
				splice, err = false, nil
			}
		}
		switch {
		case err == io.EOF:
			return st.CloseWrite()
		case err != nil:
			return err
		}
	}
}

// deliver writes st's data to dst as the proxy does, then half-closes dst.
func deliver(st *Stream, dst *sock) error {
	if _, err := st.WriteTo(dst); err != nil {
		return err
	}
	return dst.CloseWrite()
}

// openPipes counts this process's pipe descriptors, idle pooled ones
// closed first.
func openPipes(t testing.TB) int {
	t.Helper()
	idlePipes()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "pipe:") {
			n++
		}
	}
	return n
}

// smallPipes makes new pipes hold one page slot, which a 256 KiB frame
// overflows, until the end of the test.
func smallPipes(t *testing.T) {
	idlePipes()
	pipeSize = 4 << 10
	t.Cleanup(func() {
		idlePipes()
		pipeSize = 1 << 20
	})
}

// transfer sends data from legacy program a through sa, sb to legacy
// program b, and returns what b read, once b read EOF.
func transfer(t *testing.T, sa, sb *Stream, data []byte) (got []byte, up, down *sock) {
	t.Helper()
	up, a := legacyPair(t)
	down, b := legacyPair(t)
	errs := make(chan error, 3)
	// A failure closes the legacy socket it leaves waiting, so that the
	// test ends with the error rather than hangs.
	go func() {
		err := pump(sa, up)
		if err != nil {
			up.Close()
		}
		errs <- err
	}()
	go func() {
		err := deliver(sb, down)
		if err != nil {
			down.Close()
		}
		errs <- err
	}()
	go func() { errs <- sendAll(a, data) }()
	got, err := io.ReadAll(b)
	require.NoError(t, err)
	for range 3 {
		require.NoError(t, <-errs)
	}
	return got, up, down
}

// sessionKinds are the kernel sockets a session splices over.
var sessionKinds = []struct {
	name string
	pair func(testing.TB, Config) (*Session, *Session)
}{{"tcp", tcpPair}, {"unix", unixPair}}

func TestSpliceBothWays(t *testing.T) {
	for _, k := range sessionKinds {
		t.Run(k.name, func(t *testing.T) { testSpliceBothWays(t, k.pair) })
	}
}

func testSpliceBothWays(t *testing.T, pair func(testing.TB, Config) (*Session, *Session)) {
	pipes := openPipes(t)
	cli, srv := pair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	ra, rb := openPair(t, srv, cli)
	there, back := randomBytes(t, 16<<20), randomBytes(t, 12<<20)

	type result struct {
		got      []byte
		up, down *sock
	}
	done := make(chan result, 1)
	go func() {
		got, up, down := transfer(t, ra, rb, back)
		done <- result{got, up, down}
	}()
	got, up, down := transfer(t, sa, sb, there)
	r := <-done

	require.True(t, bytes.Equal(there, got), "cli→srv: %d bytes arrived of %d", len(got), len(there))
	require.True(t, bytes.Equal(back, r.got), "srv→cli: %d bytes arrived of %d", len(r.got), len(back))
	// Most bytes were spliced, not copied, on both sides of both ways.
	for _, s := range []*sock{up, down, r.up, r.down} {
		assert.Greater(t, s.spliced.Load(), int64(len(back)/2))
	}
	cli.Close()
	srv.Close()
	assert.Equal(t, pipes, openPipes(t), "pipes left open")
}

// A receiver that does not read fills its stream's pipe; the rest of its
// data is copied into memory, in order, and other streams keep flowing.
func TestSpliceSlowReceiver(t *testing.T) {
	for _, k := range sessionKinds {
		t.Run(k.name+"/pipes of 1MiB", func(t *testing.T) { testSpliceSlowReceiver(t, k.pair) })
		t.Run(k.name+"/pipes of one slot", func(t *testing.T) {
			smallPipes(t)
			testSpliceSlowReceiver(t, k.pair)
		})
	}
}

func testSpliceSlowReceiver(t *testing.T, pair func(testing.TB, Config) (*Session, *Session)) {
	pipes := openPipes(t)
	cli, srv := pair(t, Config{})
	slowA, slowB := openPair(t, cli, srv)
	fastA, fastB := openPair(t, cli, srv)

	// The slow stream's data is written in large frames (a small pipe on
	// the sending side would make small ones, which are not spliced).
	slowData := randomBytes(t, 24<<20)
	down, b := legacyPair(t)
	errs := make(chan error, 2)
	go func() { errs <- deliver(slowB, down) }()
	go func() { errs <- sendAll(slowA, slowData) }()
	// Wait until the slow stream is stalled: b reads nothing, and the
	// stream's window is used up by data in pipes and buffers.
	require.Eventually(t, func() bool { return stalled(slowA) }, 10e9, 1e6)

	fastData := randomBytes(t, 4<<20)
	got, _, _ := transfer(t, fastA, fastB, fastData)
	require.True(t, bytes.Equal(fastData, got), "fast stream: %d bytes of %d", len(got), len(fastData))

	gotSlow, err := io.ReadAll(b)
	require.NoError(t, err)
	require.True(t, bytes.Equal(slowData, gotSlow), "slow stream: %d bytes of %d", len(gotSlow), len(slowData))
	for range 2 {
		require.NoError(t, <-errs)
	}
	assert.Greater(t, down.spliced.Load(), int64(0))
	cli.Close()
	srv.Close()
	assert.Equal(t, pipes, openPipes(t), "pipes left open")
}

// Read takes data from pipes too: a stream whose WriteTo spliced and
// returned leaves its queue to Read. With small pipes, a frame fills one,
// goes on in others (maxStreamPipes in all), and the rest goes to buffers
// after them.
func TestSpliceRead(t *testing.T) {
	t.Run("pipes of 1MiB", func(t *testing.T) { testSpliceRead(t, false) })
	t.Run("pipes of one slot", func(t *testing.T) {
		smallPipes(t)
		testSpliceRead(t, true)
	})
}

func testSpliceRead(t *testing.T, overflow bool) {
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	sb.splicing.Store(true) // as WriteTo to a socket does
	data := randomBytes(t, 4<<20)
	go func() {
		_, _ = sa.Write(data)
		_ = sa.CloseWrite()
	}()
	require.Eventually(t, func() bool {
		sb.mu.Lock()
		defer sb.mu.Unlock()
		for i := sb.rhead; i < len(sb.rbufs); i++ {
			if sb.rbufs[i].p != nil && (!overflow || i+1 < len(sb.rbufs) && sb.rbufs[i+1].b != nil) {
				return true
			}
		}
		return false
	}, 10e9, 1e6, "no data spliced into a pipe (overflowing: %v)", overflow)
	if overflow {
		sb.mu.Lock()
		pipes := sb.pipes
		sb.mu.Unlock()
		require.Equal(t, maxStreamPipes, pipes, "full pipes are followed by others until the limit")
	}
	got, err := io.ReadAll(readOnly{sb})
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
}

// A reset while data sits in pipes ends both sides with a reset, leaves
// the session working, and leaks no pipe.
func TestSpliceReset(t *testing.T) {
	pipes := openPipes(t)
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	up, a := legacyPair(t)
	down, b := legacyPair(t) // b reads nothing until the reset
	pumped := make(chan error, 1)
	delivered := make(chan error, 1)
	go func() { pumped <- pump(sa, up) }()
	go func() { delivered <- deliver(sb, down) }()
	go func() { _, _ = a.Write(randomBytes(t, 32<<20)) }()
	require.Eventually(t, func() bool { return stalled(sa) && down.spliced.Load() > 0 }, 10e9, 1e6)

	require.NoError(t, sa.Reset())
	require.ErrorIs(t, <-pumped, ErrStreamReset)
	require.Eventually(t, func() bool {
		sb.mu.Lock()
		defer sb.mu.Unlock()
		return sb.state&stReadReset != 0
	}, 10e9, 1e6)
	go func() { _, _ = io.Copy(io.Discard, b) }() // lets WriteTo's last write end
	require.ErrorIs(t, <-delivered, ErrStreamReset)

	sa2, sb2 := openPair(t, cli, srv)
	data := randomBytes(t, 2<<20)
	got, _, _ := transfer(t, sa2, sb2, data)
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
	cli.Close()
	srv.Close()
	up.Close()
	assert.Equal(t, pipes, openPipes(t), "pipes left open")
}

type noSocket struct{ sock }

func (*noSocket) SyscallConn() (syscall.RawConn, error) { return nil, errors.New("not a socket") }

func TestSpliceFromRefused(t *testing.T) {
	up, _ := legacyPair(t)
	for name, pair := range map[string]func() (*Session, *Session){
		"pipe":     func() (*Session, *Session) { return pipePair(t, Config{}) },
		"NoSplice": func() (*Session, *Session) { return tcpPair(t, Config{NoSplice: true}) },
	} {
		cli, srv := pair()
		sa, _ := openPair(t, cli, srv)
		_, err := sa.SpliceFrom(up)
		assert.ErrorIs(t, err, ErrNoSplice, name)
	}
	cli, srv := tcpPair(t, Config{})
	sa, _ := openPair(t, cli, srv)
	_, err := sa.SpliceFrom(&noSocket{})
	assert.ErrorIs(t, err, ErrNoSplice, "source without a socket")
}

// parked reports whether st's WriteTo waits for data with nothing queued,
// so that the reader may deliver to its socket.
func parked(st *Stream) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.dsw != nil && st.buffered == 0
}

// A frame arriving while WriteTo waits is spliced on to WriteTo's socket
// by the reader goroutine; WriteTo counts those bytes, and everything
// arrives in order.
func TestSpliceDelivery(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	down, b := legacyPair(t)
	done := startWriteTo(sb, down)

	// Each Write is one frame that is spliced, all within the initial
	// window (a Write stalled for window would be split into frames, of
	// which some are too small to splice): the first leaves the reader
	// reading headers alone, so all of the next ones' payloads are in the
	// socket when they arrive, and WriteTo waits for them, parked.
	var sent []byte
	got := make([]byte, 0, 3<<20)
	for i := range 3 {
		require.Eventually(t, func() bool { return parked(sb) }, 5*time.Second, time.Millisecond)
		before := srv.deliveries.Load()
		data := randomBytes(t, 64<<10)
		_, err := sa.Write(data)
		require.NoError(t, err)
		sent = append(sent, data...)
		buf := make([]byte, len(data))
		_, err = io.ReadFull(b, buf)
		require.NoError(t, err)
		got = append(got, buf...)
		if i > 0 {
			require.Greater(t, srv.deliveries.Load(), before, "frame %d was not delivered by the reader", i)
		}
	}
	require.NoError(t, sa.CloseWrite())
	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, int64(len(sent)), r.n, "WriteTo's count")
	// The first frame's start was read with its header, and copied.
	require.GreaterOrEqual(t, down.spliced.Load(), int64(len(sent)-64<<10), "bytes reported spliced")
	require.True(t, bytes.Equal(sent, got))
}

// A small message arriving while WriteTo waits is written to WriteTo's
// socket by the reader goroutine (no wake-up of WriteTo's goroutine, a
// message's latency); WriteTo counts those bytes, and every message
// arrives in order. WriteTo may be awake for a moment when a message
// arrives (a wake-up left from before), and then writes it itself: most
// messages, not all, are delivered by the reader.
func TestSmallFrameDelivery(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	down, b := legacyPair(t)
	done := startWriteTo(sb, down)

	var sent, got []byte
	delivered := 0
	for i := range 20 {
		require.Eventually(t, func() bool { return parked(sb) }, 5*time.Second, time.Millisecond)
		before := srv.deliveries.Load()
		msg := randomBytes(t, 1+i*97)
		_, err := sa.Write(msg)
		require.NoError(t, err)
		sent = append(sent, msg...)
		buf := make([]byte, len(msg))
		_, err = io.ReadFull(b, buf)
		require.NoError(t, err)
		got = append(got, buf...)
		if srv.deliveries.Load() > before {
			delivered++
		}
	}
	require.GreaterOrEqual(t, delivered, 10, "messages of 20 delivered by the reader")
	require.NoError(t, sa.CloseWrite())
	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, int64(len(sent)), r.n, "WriteTo's count")
	require.Equal(t, int64(len(sent)), down.spliced.Load(), "bytes reported written")
	require.True(t, bytes.Equal(sent, got))
}

// WriteTo returning at its read deadline while the reader may be
// delivering to its socket: each return counts every byte written to the
// socket so far (the socket's reader never sees more), and the calls
// together count and deliver the whole stream, in order.
func TestSpliceDeliveryDeadlines(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	down, b := legacyPair(t)
	data := randomBytes(t, 16<<20)
	go func() { _ = sendAll(sa, data) }()

	var received atomic.Int64
	read := make(chan []byte, 1)
	go func() {
		var got []byte
		buf := make([]byte, 256<<10)
		for {
			n, err := b.Read(buf)
			got = append(got, buf[:n]...)
			received.Add(int64(n))
			if err != nil {
				read <- got
				return
			}
		}
	}()

	var total int64
	timeouts := 0
	for {
		require.NoError(t, sb.SetReadDeadline(time.Now().Add(50*time.Microsecond)))
		n, err := sb.WriteTo(down)
		total += n
		require.LessOrEqual(t, received.Load(), total, "the socket got bytes that WriteTo did not count")
		if err == nil {
			break
		}
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		timeouts++
		require.Less(t, timeouts, 1<<20, "no progress")
	}
	require.NoError(t, down.CloseWrite())
	got := <-read
	require.Equal(t, int64(len(data)), total)
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
	t.Logf("%d deadline returns, %d deliveries", timeouts, srv.deliveries.Load())
}

// WriteTo woken (here by its deadline) while the reader delivers to its
// socket waits for the delivery to end, and counts its bytes, rather than
// return while the reader still writes to the socket.
func TestSpliceDeliveryWakesWriteTo(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	sa, sb := openPair(t, cli, srv)
	down, b := legacyPair(t)

	// A first spliced frame makes the reader read the next header alone.
	done := startWriteTo(sb, down)
	require.Eventually(t, func() bool { return parked(sb) }, 5*time.Second, time.Millisecond)
	first := randomBytes(t, 64<<10)
	_, err := sa.Write(first)
	require.NoError(t, err)
	got := make([]byte, len(first))
	_, err = io.ReadFull(b, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(first, got))
	require.NoError(t, sb.SetReadDeadline(time.Now()))
	r := <-done
	require.ErrorIs(t, r.err, os.ErrDeadlineExceeded)
	require.Equal(t, int64(len(first)), r.n)
	require.NoError(t, sb.SetReadDeadline(time.Time{}))
	spliced := down.spliced.Load()

	holding, release := make(chan struct{}), make(chan struct{})
	hook := func() {
		close(holding)
		<-release
	}
	testHookDeliver.Store(&hook)
	t.Cleanup(func() { testHookDeliver.Store(nil) })
	done = startWriteTo(sb, down)
	require.Eventually(t, func() bool { return parked(sb) }, 5*time.Second, time.Millisecond)
	data := randomBytes(t, 64<<10)
	go func() { _, _ = sa.Write(data) }()
	select {
	case <-holding:
	case <-testCtx(t).Done():
		t.Fatal("the reader did not deliver the frame")
	}
	testHookDeliver.Store(nil)
	require.NoError(t, sb.SetReadDeadline(time.Now()))
	require.Eventually(t, func() bool {
		sb.mu.Lock()
		defer sb.mu.Unlock()
		return sb.dsw == nil // WriteTo woke; the delivery holds
	}, 5*time.Second, time.Millisecond)
	close(release)
	r = <-done
	require.ErrorIs(t, r.err, os.ErrDeadlineExceeded)
	require.Positive(t, r.n, "WriteTo returned before the delivery it waited for")
	got = make([]byte, r.n)
	_, err = io.ReadFull(b, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data[:r.n], got))
	require.Equal(t, spliced+r.n, down.spliced.Load())
}

// TestSplicedSplitRestReset: on a slow link the writer splits a spliced
// frame and splices its head from the stream's pipe; a reset of the stream
// meanwhile must not let SpliceFrom return and close the pipe while the
// writer still splices from it (the session's write failed with "bad file
// descriptor", ending every stream). The session lives on.
func TestSplicedSplitRestReset(t *testing.T) {
	cli, srv, g := gatedPair(t, Config{})
	up, legacy := legacyPair(t)
	st, _ := openPair(t, cli, srv)
	other, otherPeer := openPair(t, cli, srv)
	cli.pace.limit.Store(minBatchBudget) // a slow link, measured

	go func() { _, _ = legacy.Write(make([]byte, 1<<20)) }()
	// SpliceFrom fills its pipe with what is there: let more than the
	// budget arrive first.
	require.Eventually(t, func() bool { return readable(t, up.TCPConn) >= 48<<10 }, 5*time.Second, time.Millisecond)
	g.shut()
	spliced := make(chan error, 1)
	go func() {
		_, err := st.SpliceFrom(up)
		spliced <- err
	}()
	require.Eventually(t, func() bool { return splitRestQueued(cli, st) }, 5*time.Second, time.Millisecond)
	require.NoError(t, st.Reset())
	g.reopen()
	select {
	case err := <-spliced:
		require.Error(t, err)
	case <-time.After(10 * time.Second):
		require.FailNow(t, "SpliceFrom did not end after the reset")
	}
	_, err := other.Write([]byte("still here"))
	require.NoError(t, err)
	got := make([]byte, 10)
	_, err = io.ReadFull(otherPeer, got)
	require.NoError(t, err, "the session ended: %v", cli.Err())
	require.Equal(t, "still here", string(got))
	require.False(t, cli.IsClosed(), "the session ended: %v", cli.Err())
}

// readable returns how many bytes c has received that nothing has read.
func readable(t *testing.T, c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	require.NoError(t, err)
	n := 0
	require.NoError(t, rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }))
	return n
}
