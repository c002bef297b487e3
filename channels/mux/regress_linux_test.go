//go:build linux

package mux

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// Regression tests of the splice paths under stress.

// limitPipes lowers the process's pipe budget to n more pipes than are
// open now, until the end of the test.
func limitPipes(t *testing.T, n int) {
	idlePipes()
	old := pipeLimit.Load()
	pipeLimit.Store(pipesOpen.Load() + int32(n))
	t.Cleanup(func() { pipeLimit.Store(old) })
}

// TestSpliceAfterManySmallFrames: a spliced frame whose batch holds more
// than the kernel's 1024 iovecs before it (here three streams' Writes in
// 1 KiB frames, queued while the peer did not read) goes out in several
// sendmsg calls instead of ending the session with EMSGSIZE.
func TestSpliceAfterManySmallFrames(t *testing.T) {
	cli, srv, g := gatedPair(t, Config{MaxFrame: minMaxFrame})
	filler, fillerPeer := openPair(t, cli, srv)
	spl, splPeer := openPair(t, cli, srv)
	type pair struct{ a, b *Stream }
	var bulk []pair
	for range 3 {
		a, b := openPair(t, cli, srv)
		bulk = append(bulk, pair{a, b})
	}

	// The peer stops reading; the filler's Write takes the connection and
	// stalls in it; what is written next queues into one batch.
	g.shut()
	fill := randomBytes(t, 256<<10)
	go func() { _, _ = filler.Write(fill) }()
	require.Eventually(t, func() bool { return stuck(cli, filler) }, 5*time.Second, time.Millisecond)
	var wg sync.WaitGroup
	for _, p := range bulk {
		data := randomBytes(t, 200<<10) // 200 frames, 400 iovecs
		wg.Go(func() { assert.NoError(t, sendAll(p.a, data)) })
		wg.Go(func() {
			got, err := io.ReadAll(p.b)
			assert.NoError(t, err)
			assert.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
		})
	}
	require.Eventually(t, func() bool { return queuedWrites(cli) == len(bulk) }, 5*time.Second, time.Millisecond)
	up, a := legacyPair(t)
	spliced := randomBytes(t, 32<<10)
	_, err := a.Write(spliced)
	require.NoError(t, err)
	require.NoError(t, a.CloseWrite())
	wg.Go(func() { assert.NoError(t, pump(spl, up)) })
	require.Eventually(t, func() bool { return queuedPipeFrames(cli) == 1 }, 5*time.Second, time.Millisecond)

	g.reopen()
	got, err := io.ReadAll(splPeer)
	require.NoError(t, err)
	require.True(t, bytes.Equal(spliced, got), "spliced stream: %d bytes of %d", len(got), len(spliced))
	wg.Wait()
	got = make([]byte, len(fill))
	_, err = io.ReadFull(fillerPeer, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(fill, got))
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
}

// TestSpliceFromOutOfPipes: with no pipe to be had, SpliceFrom refuses
// with ErrNoSplice before it takes anything from its source, so that its
// caller copies instead, and every connection completes.
func TestSpliceFromOutOfPipes(t *testing.T) {
	const conns = 24
	pipes := openPipes(t)
	cli, srv := tcpPair(t, Config{})
	type pair struct{ a, b *Stream }
	var streams []pair
	for range conns {
		a, b := openPair(t, cli, srv)
		streams = append(streams, pair{a, b})
	}
	limitPipes(t, 0)
	up, _ := legacyPair(t)
	n, err := streams[0].a.SpliceFrom(up)
	require.ErrorIs(t, err, ErrNoSplice)
	require.Zero(t, n)

	limitPipes(t, 8) // fewer than the connections: some copy
	var wg sync.WaitGroup
	for i, p := range streams {
		data := randomBytes(t, (1+i%4)<<18)
		wg.Go(func() {
			got, _, _ := transfer(t, p.a, p.b, data)
			assert.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
		})
	}
	wg.Wait()
	require.Positive(t, SpliceStats().PipeShortages)
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
	cli.Close()
	srv.Close()
	assert.Equal(t, pipes, openPipes(t), "pipes left open")
}

// TestSpliceSeesEnd: the connection's end (FIN or RST) in the middle of a
// frame being spliced into a pipe that is full is seen at once, and ends
// the session; a full pipe makes splice(2) fail with EAGAIN before it
// looks at the socket.
func TestSpliceSeesEnd(t *testing.T) {
	for _, end := range []string{"FIN", "RST"} {
		t.Run(end, func(t *testing.T) {
			smallPipes(t) // one slot: the first fragment fills it
			c1, c2 := tcpConns(t)
			s, err := Server(c1, quiet(Config{}))
			require.NoError(t, err)
			defer s.Close()
			defer c2.Close()
			_, err = c2.Write(frameBytes(typeData, flagSYN, 1, 1, []byte{'x'}))
			require.NoError(t, err)
			st, err := s.AcceptStream(testCtx(t))
			require.NoError(t, err)
			_, err = io.ReadFull(st, make([]byte, 1))
			require.NoError(t, err)
			st.splicing.Store(true) // as WriteTo to a socket does

			// A large frame's header alone, then a first fragment of its
			// payload once the session has read the header: that fragment
			// is spliced into the pipe, and fills it.
			frames := s.framesIn.Load()
			_, err = c2.Write(frameBytes(typeData, 0, 1, 100_000, nil))
			require.NoError(t, err)
			require.Eventually(t, func() bool { return s.framesIn.Load() > frames }, 5*time.Second, time.Millisecond)
			_, err = c2.Write(make([]byte, 1000))
			require.NoError(t, err)
			require.Eventually(t, func() bool { _, _, b := streamState(st); return b == 1000 }, 5*time.Second, time.Millisecond)

			if end == "RST" {
				require.NoError(t, c2.(*net.TCPConn).SetLinger(0))
			}
			require.NoError(t, c2.Close())
			select {
			case <-s.CloseChan():
			case <-testCtx(t).Done():
				t.Fatal("the session missed its connection's end")
			}
			_, err = st.Read(make([]byte, 2000))
			if err == nil { // the 1000 bytes before the end
				_, err = st.Read(make([]byte, 1))
			}
			requireReset(t, err)
		})
	}
}

// TestWriteToInterrupted: a reset, or the session's end, interrupts a
// WriteTo blocked on a destination that does not read, whether it copies
// or splices to it.
func TestWriteToInterrupted(t *testing.T) {
	for _, how := range []string{"copy", "splice"} {
		for _, end := range []string{"peer reset", "local reset", "session closed"} {
			t.Run(how+"/"+end, func(t *testing.T) {
				cli, srv := tcpPair(t, Config{NoSplice: how == "copy"})
				sa, sb := openPair(t, cli, srv)
				dst, stuck := legacyPair(t) // stuck never reads
				smallBuffers(t, 4<<10, dst, stuck)
				done := startWriteTo(sb, dst)
				go func() { _, _ = sa.Write(make([]byte, 8<<20)) }()
				// sa stalls once sb's window is full: WriteTo holds data
				// it cannot write.
				require.Eventually(t, func() bool { return stalled(sa) }, 5*time.Second, time.Millisecond)
				switch end {
				case "peer reset":
					require.NoError(t, sa.Reset())
				case "local reset":
					require.NoError(t, sb.Reset())
				case "session closed":
					require.NoError(t, srv.Close())
				}
				select {
				case r := <-done:
					requireReset(t, r.err)
				case <-testCtx(t).Done():
					t.Fatal("WriteTo still blocked on its destination")
				}
			})
		}
	}
}

// TestSpliceFromDeadline: a write deadline that passes while SpliceFrom's
// frame waits for the writer does not drop the bytes SpliceFrom took from
// its source: they are sent, and counted.
func TestSpliceFromDeadline(t *testing.T) {
	cli, srv, g := gatedPair(t, Config{})
	filler, fillerPeer := openPair(t, cli, srv)
	sa, sb := openPair(t, cli, srv)
	up, a := legacyPair(t)
	data := randomBytes(t, 4<<20)
	go func() { _ = sendAll(a, data) }()
	received := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(sb) // a reset ends it too
		received <- got
	}()

	g.shut()
	go func() { _, _ = filler.Write(make([]byte, 256<<10)) }()
	require.Eventually(t, func() bool { return stuck(cli, filler) }, 5*time.Second, time.Millisecond)
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := sa.SpliceFrom(up)
		done <- result{n, err}
	}()
	require.Eventually(t, func() bool { return queuedPipeFrames(cli) == 1 }, 5*time.Second, time.Millisecond)
	require.NoError(t, sa.SetWriteDeadline(time.Now()))
	// Give a Write that wrongly withdraws its frame at the deadline the
	// time to do it, before the writer can take the frame.
	var r result
	select {
	case r = <-done:
	case <-time.After(100 * time.Millisecond):
	}
	g.reopen()
	go func() { _, _ = io.Copy(io.Discard, fillerPeer) }()
	if r == (result{}) {
		r = <-done
	}
	if r.err != nil {
		require.ErrorIs(t, r.err, os.ErrDeadlineExceeded)
	}
	require.Positive(t, r.n, "the bytes taken from the source were sent")
	require.NoError(t, sa.SetWriteDeadline(time.Time{}))
	err := pump(sa, up)
	if err != nil {
		sa.Reset()
	}
	require.NoError(t, err)
	got := <-received
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
}

// TestWriteTimeoutSlowSplice: a spliced frame that takes longer than
// WriteTimeout to leave on a slow link (the peer reads, slowly) does not
// end the session: the timeout bounds a write that makes no progress.
func TestWriteTimeoutSlowSplice(t *testing.T) {
	t.Parallel() // it mostly waits for its slow reader
	c1, c2 := tcpConns(t)
	smallBuffers(t, 32<<10, c1, c2)
	cli, srv := newPair(t, c1, throttle(c2, 160<<10, 8<<10), Config{WriteTimeout: time.Second}, Config{})
	sa, sb := openPair(t, cli, srv)
	// The source holds all the data before the pump starts, so that the
	// first spliced frame is a window's worth: 1.6s at the link's rate.
	up, a := legacyPair(t)
	require.NoError(t, up.SetReadBuffer(1<<20))
	data := randomBytes(t, 512<<10)
	require.NoError(t, sendAll(a, data))
	pumped := make(chan error, 1)
	go func() { pumped <- pump(sa, up) }()
	got, err := io.ReadAll(sb)
	require.NoError(t, err)
	require.NoError(t, <-pumped)
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
	require.Greater(t, up.spliced.Load(), int64(len(data)/2), "bytes spliced")
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
}

// TestSessionCapsRetransmitTimeout: a session over TCP caps its socket's
// retransmission timeout, on both ends, so that TCP's exponential backoff
// does not hold every stream for many seconds after a link is back (the
// behaviour itself is tested across namespaces in e2e/netns); and since
// the cap would shorten the time after which the kernel gives up on the
// connection from about 15 minutes to 27s, it sets that time back.
func TestSessionCapsRetransmitTimeout(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	for _, s := range []*Session{cli, srv} {
		opt := func(name int) int {
			var (
				v   int
				err error
			)
			require.NoError(t, s.tcp.Control(func(fd uintptr) {
				v, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, name)
			}))
			if err != nil {
				t.Skipf("this kernel has no TCP_RTO_MAX_MS (Linux 6.15): %v", err)
			}
			return v
		}
		assert.Equal(t, 2000, opt(unix.TCP_RTO_MAX_MS))
		assert.Equal(t, int(kernelGiveUp()/time.Millisecond), opt(unix.TCP_USER_TIMEOUT))
	}
	// A session that ended leaves its socket to the kernel's bounds for a
	// closed socket, short with the cap, instead of 15 minutes of
	// retransmitting to a dead peer. (A duplicate descriptor keeps the
	// socket to look at.)
	var dup int
	var derr error
	require.NoError(t, cli.tcp.Control(func(fd uintptr) { dup, derr = unix.Dup(int(fd)) }))
	require.NoError(t, derr)
	defer unix.Close(dup)
	require.NoError(t, cli.Close())
	ms, err := unix.GetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	require.NoError(t, err)
	assert.Zero(t, ms)
}

// TestBackoffModel: the time the kernel retransmits before giving up, by
// its model (tcp_model_timeout): 924.6s with the default tcp_retries2 of
// 15, 102.2s with 8 (a common setting for fail-over).
func TestBackoffModel(t *testing.T) {
	assert.Equal(t, 924600*time.Millisecond, backoffModel(15))
	assert.Equal(t, 102200*time.Millisecond, backoffModel(8))
	assert.Equal(t, 600*time.Millisecond, backoffModel(1))
}

// TestCloseLingersBriefly: over TCP, a closed session shuts its sending
// side after the GoAway and keeps the connection for the peer to close
// its own (Session.linger); a peer whose kernel took everything, but that
// neither reads nor closes, holds it about goAwayWait, not maxLinger. It
// then gets the GoAway and a clean end, not a reset.
func TestCloseLingersBriefly(t *testing.T) {
	c1, c2 := tcpConns(t)
	defer c2.Close()
	cli, err := Client(c1, quiet(Config{}))
	require.NoError(t, err)
	start := time.Now()
	require.NoError(t, cli.Close())
	assert.Less(t, time.Since(start), maxLinger, "Close waited for a peer that does not read")

	got, err := io.ReadAll(c2)
	require.NoError(t, err, "the peer saw a reset, not the end")
	require.GreaterOrEqual(t, len(got), headerSize)
	last := decodeHeader(got[len(got)-headerSize:])
	assert.Equal(t, typeGoAway, last.typ, "the last frame is not the GoAway")
	assert.Equal(t, uint32(goAwayNormal), last.length)
}
