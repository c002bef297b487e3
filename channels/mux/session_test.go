package mux

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigValidation(t *testing.T) {
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	_, err := Client(c1, Config{MaxStreamWindow: 1000, MaxFrame: 10, WriteTimeout: -1, AcceptBacklog: -1, MaxBuffered: 1 << 19})
	require.Error(t, err)
	for _, field := range []string{"MaxStreamWindow", "MaxFrame", "WriteTimeout", "AcceptBacklog", "MaxBuffered"} {
		require.ErrorContains(t, err, field)
	}
	cfg, err := Config{}.withDefaults()
	require.NoError(t, err)
	require.Equal(t, uint32(DefaultMaxStreamWindow), cfg.MaxStreamWindow)
	require.Equal(t, uint32(DefaultMaxFrame), cfg.MaxFrame)
	require.Equal(t, DefaultAcceptBacklog, cfg.AcceptBacklog)
	require.Equal(t, int64(DefaultMaxBuffered), cfg.MaxBuffered)
}

// TestSessionEnd: the peer dies (its connection closes) while streams are
// mid-transfer: every pending and later operation fails with a reset that
// is not io.EOF, and the sessions and their goroutines end.
func TestSessionEnd(t *testing.T) {
	for _, tc := range []struct {
		name string
		kill func(cli, srv *Session, srvConn net.Conn)
	}{
		{"peer connection closed", func(_, _ *Session, c net.Conn) { c.Close() }},
		{"peer session closed", func(_, srv *Session, _ net.Conn) { srv.Close() }},
		{"local session closed", func(cli, _ *Session, _ net.Conn) { cli.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c1, c2 := tcpConns(t)
			cli, srv := newPair(t, c1, c2, Config{}, Config{})

			// reader waits for data, writer is stalled at the window, and
			// copier is in WriteTo of a stream the peer floods.
			reader, _ := openPair(t, cli, srv)
			writer, _ := openPair(t, cli, srv)
			copier, flood := openPair(t, cli, srv)
			go func() {
				buf := make([]byte, 64<<10)
				for {
					if _, err := flood.Write(buf); err != nil {
						return
					}
				}
			}()
			errs := make(chan error, 3)
			go func() {
				_, err := reader.Read(make([]byte, 10))
				errs <- err
			}()
			writeErr := fillWindow(t, writer, 4<<20)
			go func() { errs <- <-writeErr }()
			copied := make(chan struct{})
			go func() {
				_, err := copier.WriteTo(writerFunc(func(b []byte) (int, error) {
					select {
					case <-copied:
					default:
						close(copied)
					}
					return len(b), nil
				}))
				errs <- err
			}()
			<-copied

			tc.kill(cli, srv, c2)
			for range 3 {
				requireReset(t, <-errs)
			}
			for _, st := range []*Stream{reader, writer, copier} {
				_, err := st.Read(make([]byte, 1))
				requireReset(t, err)
				_, err = st.Write([]byte("x"))
				requireReset(t, err)
				_, err = st.WriteTo(io.Discard)
				requireReset(t, err)
				require.Error(t, st.CloseWrite())
				require.NoError(t, st.Close())
			}
			for _, s := range []*Session{cli, srv} {
				select {
				case <-s.CloseChan():
				case <-time.After(5 * time.Second):
					t.Fatal("session did not end")
				}
				require.True(t, s.IsClosed())
				require.Error(t, s.Err())
				require.Equal(t, 0, s.NumStreams())
				_, err := s.OpenStream(testCtx(t))
				require.ErrorIs(t, err, ErrSessionClosed)
				_, err = s.AcceptStream(testCtx(t))
				require.ErrorIs(t, err, ErrSessionClosed)
				s.wg.Wait() // its goroutines end on their own
			}
		})
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// TestGoAway: Close tells the peer, whose Err then matches ErrRemoteGoAway.
func TestGoAway(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	require.NoError(t, cli.Close())
	require.Equal(t, ErrSessionClosed, cli.Err())
	<-srv.CloseChan()
	require.ErrorIs(t, srv.Err(), ErrRemoteGoAway)
	require.NoError(t, cli.Close(), "idempotent")
}

// TestCloseFlushesFIN: a FIN queued before the session's Close reaches
// the peer, whose stream then ends cleanly.
func TestCloseFlushesFIN(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	st, peer := openPair(t, cli, srv)
	_, err := st.Write([]byte("last words"))
	require.NoError(t, err)
	require.NoError(t, st.CloseWrite())
	require.NoError(t, cli.Close())
	got, err := io.ReadAll(peer)
	require.NoError(t, err)
	require.Equal(t, "last words", string(got))
	<-srv.CloseChan()
	require.ErrorIs(t, srv.Err(), ErrRemoteGoAway)
	_, err = peer.Write([]byte("x"))
	requireReset(t, err)
}

// TestOpenSendsNothing: OpenStream sends nothing; the first Write is one
// frame carrying SYN and the data, and the acceptor's first frame carries
// ACK.
func TestOpenSendsNothing(t *testing.T) {
	c1, c2 := tcpConns(t)
	cc := &countingConn{Conn: c1}
	sc := &countingConn{Conn: c2}
	cli, srv := newPair(t, cc, sc, Config{}, Config{})
	// Let the keepalive's first ping exchange pass.
	require.Eventually(t, func() bool { return cli.rtt.Load() > 0 && srv.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	for _, c := range []*countingConn{cc, sc} {
		c.mu.Lock()
		c.record = true
		c.mu.Unlock()
		c.writes.Store(0)
	}

	st, err := cli.OpenStream(testCtx(t))
	require.NoError(t, err)
	require.Zero(t, st.ID())
	require.Equal(t, 1, cli.NumStreams())
	_, err = st.Write([]byte("hello"))
	require.NoError(t, err)
	require.Equal(t, uint32(1), st.ID())

	peer, err := srv.AcceptStream(testCtx(t))
	require.NoError(t, err)
	buf := make([]byte, 5)
	_, err = io.ReadFull(peer, buf)
	require.NoError(t, err)
	require.Equal(t, int64(1), cc.writes.Load(), "one write")
	_, err = peer.Write([]byte("world"))
	require.NoError(t, err)
	_, err = io.ReadFull(st, buf)
	require.NoError(t, err)
	require.Equal(t, "world", string(buf))

	cc.mu.Lock()
	hs := parseFrames(t, cc.written)
	cc.mu.Unlock()
	require.Equal(t, []header{{typ: typeData, flags: flagSYN, id: 1, length: 5}}, hs)
	sc.mu.Lock()
	hs = parseFrames(t, sc.written)
	sc.mu.Unlock()
	// AcceptStream acknowledges the stream at once, data or not, so that
	// the opener may open more (Config.MaxPendingOpens).
	require.Equal(t, []header{
		{typ: typeWindowUpdate, flags: flagACK, id: 1},
		{typ: typeData, id: 1, length: 5},
	}, hs)
}

// TestCoalescing: frames queued while the writer is busy go out in one
// write.
func TestCoalescing(t *testing.T) {
	const n = 20
	c1, c2 := tcpConns(t)
	cc := &countingConn{Conn: c1}
	cli, srv := newPair(t, cc, c2, Config{}, Config{})
	ctx := testCtx(t)

	streams := make([]*Stream, n)
	peers := make([]*Stream, n)
	for i := range streams {
		streams[i], peers[i] = openPair(t, cli, srv)
	}
	require.Eventually(t, func() bool { return cli.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)

	// Hold the writer inside a write, queue n small Writes, release.
	blocker, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	held, release := cc.hold()
	defer release()
	go func() {
		_, err := blocker.Write([]byte("block"))
		assert.NoError(t, err)
	}()
	<-held
	before := cc.writes.Load()
	var wg sync.WaitGroup
	for i, st := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := st.Write([]byte{byte(i)})
			assert.NoError(t, err)
		}()
	}
	// n, or n+1 if a ping took the held write and blocker's frame waits
	// too.
	require.Eventually(t, func() bool { return queuedWrites(cli) >= n }, 5*time.Second, time.Millisecond)
	release()
	wg.Wait()
	for i, p := range peers {
		var b [1]byte
		_, err := io.ReadFull(p, b[:])
		require.NoError(t, err)
		require.Equal(t, byte(i), b[0])
	}
	// Everything arrived, so everything was written.
	writes := cc.writes.Load() - before
	require.LessOrEqual(t, writes, int64(2), "the held write and one batch")
}

func TestKeepAliveTimeout(t *testing.T) {
	c1, c2 := net.Pipe()
	defer c2.Close()
	go func() { _, _ = io.Copy(io.Discard, c2) }() // reads, never answers
	const interval, timeout = 50 * time.Millisecond, 100 * time.Millisecond
	start := time.Now()
	s, err := Client(c1, quiet(Config{KeepAliveInterval: interval, KeepAliveTimeout: timeout}))
	require.NoError(t, err)
	defer s.Close()
	select {
	case <-s.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("session did not end")
	}
	require.ErrorIs(t, s.Err(), ErrKeepAliveTimeout)
	require.Less(t, time.Since(start), interval+timeout+time.Second)
}

func TestKeepAliveHealthy(t *testing.T) {
	cli, srv := pipePair(t, Config{KeepAliveInterval: 10 * time.Millisecond, KeepAliveTimeout: 100 * time.Millisecond})
	require.Eventually(t, func() bool { return srv.framesIn.Load() >= 10 && cli.framesIn.Load() >= 10 },
		5*time.Second, time.Millisecond)
	require.False(t, cli.IsClosed())
	require.False(t, srv.IsClosed())
	rtt, err := cli.Ping(testCtx(t))
	require.NoError(t, err)
	require.Positive(t, rtt)
}

func TestAcceptBacklogFull(t *testing.T) {
	cli, srv := tcpPair(t, Config{AcceptBacklog: 2})
	ctx := testCtx(t)
	var streams []*Stream
	for i := range 3 { // the third overflows the backlog
		st, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		_, err = st.Write([]byte{byte(i)})
		require.NoError(t, err)
		streams = append(streams, st)
	}
	_, err := streams[2].Read(make([]byte, 1))
	requireReset(t, err)
	for i := range 2 {
		st, err := srv.AcceptStream(ctx)
		require.NoError(t, err)
		var b [1]byte
		_, err = io.ReadFull(st, b[:])
		require.NoError(t, err)
		require.Equal(t, byte(i), b[0])
		echo(t, streams[i], st)
	}
}

func TestMaxIncomingStreams(t *testing.T) {
	c1, c2 := tcpConns(t)
	cli, srv := newPair(t, c1, c2, Config{}, Config{MaxIncomingStreams: 2})
	a, pa := openPair(t, cli, srv)
	b, pb := openPair(t, cli, srv)
	extra, err := cli.OpenStream(testCtx(t))
	require.NoError(t, err)
	_, err = extra.Write([]byte("x"))
	require.NoError(t, err)
	_, err = extra.Read(make([]byte, 1))
	requireReset(t, err)
	echo(t, a, pa)
	echo(t, b, pb)

	// Once one ends, a new one is welcome.
	require.NoError(t, a.Reset())
	require.Eventually(t, func() bool { return srv.NumStreams() == 1 }, 5*time.Second, time.Millisecond)
	c, pc := openPair(t, cli, srv)
	echo(t, c, pc)
}

// echo checks that a message goes from a to b and back.
func echo(t *testing.T, a, b *Stream) {
	t.Helper()
	_, err := a.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(b, buf)
	require.NoError(t, err)
	_, err = b.Write(buf)
	require.NoError(t, err)
	_, err = io.ReadFull(a, buf)
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf))
}

// rawPeer runs a server session against a raw connection the test writes
// frames to; it returns the session and what the session wrote.
func rawPeer(t *testing.T, cfg Config) (*Session, net.Conn, <-chan []byte) {
	c1, c2 := net.Pipe()
	s, err := Server(c1, quiet(cfg))
	require.NoError(t, err)
	t.Cleanup(func() { s.Close(); c2.Close() })
	out := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c2)
		out <- b
	}()
	return s, c2, out
}

func TestProtocolErrors(t *testing.T) {
	big := make([]byte, initialWindow+1)
	for _, tc := range []struct {
		name  string
		input []byte
	}{
		{"bad version", append([]byte{1}, frameBytes(typePing, flagSYN, 0, 1, nil)[1:]...)},
		{"unknown type", frameBytes(7, 0, 0, 0, nil)},
		{"SYN with our parity", frameBytes(typeData, flagSYN, 2, 0, nil)},
		{"SYN on stream 0", frameBytes(typeWindowUpdate, flagSYN, 0, 0, nil)},
		{"SYN reusing an ID", append(frameBytes(typeWindowUpdate, flagSYN, 5, 0, nil), frameBytes(typeWindowUpdate, flagSYN, 3, 0, nil)...)},
		{"window exceeded", frameBytes(typeData, flagSYN, 1, uint32(len(big)), big)},
		{"larger than any window", frameBytes(typeData, 0, 9, 1<<30, nil)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, c, out := rawPeer(t, Config{})
			go func() { _, _ = c.Write(tc.input) }()
			select {
			case <-s.CloseChan():
			case <-time.After(5 * time.Second):
				t.Fatal("session did not end")
			}
			require.ErrorIs(t, s.Err(), ErrProtocol)
			hs := parseFrames(t, <-out)
			require.NotEmpty(t, hs)
			require.Equal(t, header{typ: typeGoAway, length: goAwayProtocol}, hs[len(hs)-1])
		})
	}
}

// TestUnknownStreamData: data for a stream we do not know (say, one we
// reset) is skipped, and the session goes on.
func TestUnknownStreamData(t *testing.T) {
	s, c, _ := rawPeer(t, Config{})
	in := frameBytes(typeData, 0, 7, 5, []byte("stale"))
	in = append(in, frameBytes(typeData, flagSYN, 1, 2, []byte("ok"))...)
	go func() { _, _ = c.Write(in) }()
	st, err := s.AcceptStream(testCtx(t))
	require.NoError(t, err)
	buf := make([]byte, 2)
	_, err = io.ReadFull(st, buf)
	require.NoError(t, err)
	require.Equal(t, "ok", string(buf))
	require.False(t, s.IsClosed())
}

// TestIdleStreamsMemory: idle streams cost little memory.
func TestIdleStreamsMemory(t *testing.T) {
	const n = 10000
	cli, srv := tcpPair(t, Config{AcceptBacklog: n})
	ctx := testCtx(t)
	accepted := make(chan []*Stream)
	go func() {
		var all []*Stream
		for range n {
			st, err := srv.AcceptStream(ctx)
			if !assert.NoError(t, err) {
				break
			}
			all = append(all, st)
		}
		accepted <- all
	}()
	heap := func() uint64 {
		runtime.GC() // twice: pooled buffers survive one
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	streams := make([]*Stream, n)
	for i := range streams {
		st, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		_, err = st.Write([]byte{1})
		require.NoError(t, err)
		streams[i] = st
	}
	peers := <-accepted
	require.Equal(t, n, len(peers))
	for _, p := range peers {
		var b [1]byte
		_, err := p.Read(b[:])
		require.NoError(t, err)
	}
	perStream := (int64(heap()) - int64(before)) / n // both ends
	t.Logf("idle stream pair: %d bytes", perStream)
	require.Less(t, perStream, int64(2048))
	require.Equal(t, n, cli.NumStreams())
	require.Equal(t, n, srv.NumStreams())
	runtime.KeepAlive(streams)
}

func TestPingAfterClose(t *testing.T) {
	cli, _ := pipePair(t, Config{})
	require.NoError(t, cli.Close())
	_, err := cli.Ping(context.Background())
	require.ErrorIs(t, err, ErrSessionClosed)
}

// TestSynFinData: a stream opened, written and half-closed by the peer
// at once reads its data and then io.EOF.
func TestSynFinData(t *testing.T) {
	s, c, _ := rawPeer(t, Config{})
	in := frameBytes(typeData, flagSYN, 1, 3, []byte("abc"))
	in = append(in, frameBytes(typeData, flagFIN, 1, 3, []byte("def"))...)
	go func() { _, _ = c.Write(in) }()
	st, err := s.AcceptStream(testCtx(t))
	require.NoError(t, err)
	got, err := io.ReadAll(st)
	require.NoError(t, err)
	require.Equal(t, "abcdef", string(got))
}

// TestWriteTimeout: a peer that stops reading ends the session after
// WriteTimeout, and the streams' errors are resets, not timeouts.
func TestWriteTimeout(t *testing.T) {
	c1, c2 := net.Pipe() // c2 is never read
	defer c2.Close()
	s, err := Client(c1, quiet(Config{WriteTimeout: 50 * time.Millisecond}))
	require.NoError(t, err)
	defer s.Close()
	st, err := s.OpenStream(testCtx(t))
	require.NoError(t, err)
	_, err = st.Write(make([]byte, 2*smallWrite)) // large enough to wait for the writer
	requireReset(t, err)
	require.NotErrorIs(t, err, os.ErrDeadlineExceeded)
	<-s.CloseChan()
	require.ErrorIs(t, s.Err(), os.ErrDeadlineExceeded)
}

// TestCancelledFirstWrite: a first Write withdrawn at its deadline while
// queued leaves its SYN in place, so stream IDs still reach the peer in
// order, and none of its data goes out.
func TestCancelledFirstWrite(t *testing.T) {
	c1, c2 := tcpConns(t)
	cc := &countingConn{Conn: c1}
	cli, srv := newPair(t, cc, c2, Config{}, Config{})
	ctx := testCtx(t)
	require.Eventually(t, func() bool { return cli.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)

	blocker, _ := openPair(t, cli, srv)
	held, release := cc.hold()
	defer release()
	go func() {
		_, err := blocker.Write([]byte("held"))
		assert.NoError(t, err)
	}()
	<-held

	a, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	require.NoError(t, a.SetWriteDeadline(time.Now().Add(20*time.Millisecond)))
	n, err := a.Write(bytes.Repeat([]byte("withdrawn"), smallWrite)) // large enough to wait
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.Zero(t, n)
	require.NoError(t, a.SetWriteDeadline(time.Time{}))

	b, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	bDone := make(chan error, 1)
	go func() {
		_, err := b.Write([]byte("b"))
		bDone <- err
	}()
	// b's first frame is queued (it has its ID) behind a's emptied one.
	// (Counting the queue's data frames would race with a ping taking
	// the held write, which leaves blocker's frame queued too.)
	require.Eventually(t, func() bool { return b.ID() != 0 }, 5*time.Second, time.Millisecond)
	release()
	require.NoError(t, <-bDone)
	_, err = a.Write([]byte("a"))
	require.NoError(t, err)
	require.Less(t, a.ID(), b.ID())

	for _, want := range []string{"a", "b"} {
		peer, err := srv.AcceptStream(ctx)
		require.NoError(t, err)
		buf := make([]byte, 1)
		_, err = io.ReadFull(peer, buf)
		require.NoError(t, err)
		require.Equal(t, want, string(buf))
	}
	require.False(t, srv.IsClosed())
}
