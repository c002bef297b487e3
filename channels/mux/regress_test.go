package mux

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Regression tests for failures under stress: each one ended a healthy
// session, or grew memory without bound, before the fix it goes with.

// TestWriteTimeoutSlowLink: WriteTimeout detects a peer that stops
// reading, not a link slower than what is queued. Many streams write at
// once to a peer that reads steadily but slowly: the writer's batches
// take much longer than WriteTimeout, and the session must live.
func TestWriteTimeoutSlowLink(t *testing.T) {
	t.Parallel() // it mostly waits for its slow reader
	for _, k := range []struct {
		name  string
		conns func(t testing.TB) (net.Conn, net.Conn)
	}{
		{"pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }},
		{"tcp", func(t testing.TB) (net.Conn, net.Conn) {
			c1, c2 := tcpConns(t)
			smallBuffers(t, 32<<10, c1, c2)
			return c1, c2
		}},
		{"unix", func(t testing.TB) (net.Conn, net.Conn) {
			c1, c2 := unixConns(t)
			smallBuffers(t, 32<<10, c1, c2)
			return c1, c2
		}},
	} {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			const (
				streams = 8
				size    = 64 << 10
				rate    = 256 << 10 // bytes/s: the whole transfer takes 2s
			)
			c1, c2 := k.conns(t)
			cli, srv := newPair(t, c1, throttle(c2, rate, 8<<10), Config{WriteTimeout: time.Second}, Config{})
			uploads(t, cli, srv, streams, size)
			require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
		})
	}
}

// TestRefusalFlood: a peer that opens streams past the accept backlog
// without reading our refusals is held back: the refusals queued for it
// stay bounded, the log gets a line now and then, not one per stream, and
// every refusal is counted.
func TestRefusalFlood(t *testing.T) {
	const syns = 200_000
	c1, c2 := tcpConns(t)
	smallBuffers(t, 128<<10, c1, c2)
	logs := &countingHandler{}
	s, err := Server(c1, Config{AcceptBacklog: 1, Logger: slog.New(logs)})
	require.NoError(t, err)
	defer s.Close()
	defer c2.Close()

	frames := make([]byte, 0, syns*headerSize)
	for i := range syns {
		frames = append(frames, frameBytes(typeWindowUpdate, flagSYN, uint32(2*i+1), 0, nil)...)
	}
	// The peer floods without reading; what it manages to write in a
	// while is what the session takes in before it holds back.
	n, peak := flood(t, s, c2, frames)
	t.Logf("peer wrote %d of %d SYNs before it stalled; peak queue %d frames", n/headerSize, syns, peak)
	require.LessOrEqual(t, peak, maxQueuedRefusals+maxQueuedPongs+16, "refusals queued without bound")
	require.False(t, s.IsClosed(), "session ended: %v", s.Err())

	// The peer reads again: everything is refused and counted.
	refused := make(chan int, 1)
	go func() {
		k := 0
		b := make([]byte, headerSize)
		br := bufio.NewReader(c2)
		for {
			if _, err := io.ReadFull(br, b); err != nil {
				refused <- k
				return
			}
			if h := decodeHeader(b); h.flags&flagRST != 0 {
				if k++; k == syns-1 {
					refused <- k
					return
				}
			}
		}
	}()
	_, err = c2.Write(frames[n:])
	require.NoError(t, err)
	require.Equal(t, syns-1, <-refused, "RSTs received")
	require.Equal(t, uint64(syns-1), s.LimitStats().RefusedBacklog)
	require.LessOrEqual(t, logs.n.Load(), int64(3), "log lines")
	require.False(t, s.IsClosed(), "session ended: %v", s.Err())
}

// flood writes frames to peer, the other end of s's connection, for a
// second at most (the session may stop reading), sampling s's send queue
// meanwhile; it returns how many bytes went, and the queue's peak.
func flood(t *testing.T, s *Session, peer net.Conn, frames []byte) (sent, peak int) {
	t.Helper()
	done := make(chan int, 1)
	go func() {
		_ = peer.SetWriteDeadline(time.Now().Add(time.Second))
		n, _ := peer.Write(frames)
		_ = peer.SetWriteDeadline(time.Time{})
		done <- n
	}()
	tick := time.NewTicker(200 * time.Microsecond)
	defer tick.Stop()
	for {
		peak = max(peak, queueLen(s))
		select {
		case sent = <-done:
			return sent, peak
		case <-tick.C:
		}
	}
}

// uploads opens streams from cli to srv and sends size bytes on each at
// once, checking every byte that arrives.
func uploads(t *testing.T, cli, srv *Session, streams, size int) {
	t.Helper()
	type pair struct{ a, b *Stream }
	var pairs []pair
	for range streams {
		a, b := openPair(t, cli, srv)
		pairs = append(pairs, pair{a, b})
	}
	var wg sync.WaitGroup
	for _, p := range pairs {
		data := randomBytes(t, size)
		wg.Go(func() { assert.NoError(t, sendAll(p.a, data)) })
		wg.Go(func() {
			got, err := io.ReadAll(p.b)
			assert.NoError(t, err)
			assert.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
		})
	}
	wg.Wait()
}

// TestKeepAliveSlowBulk: a session that receives a bulk transfer slowly
// (a frame takes longer than KeepAliveTimeout to arrive, so does the
// pong queued behind it) is alive: payload bytes are a sign of life as
// much as frame headers.
func TestKeepAliveSlowBulk(t *testing.T) {
	t.Parallel() // it mostly waits for its slow reader
	c1, c2 := tcpConns(t)
	// Frames of 256 KiB (the window) take 2s each.
	cli, srv := newPair(t, c1, throttle(c2, 128<<10, 4<<10), Config{},
		Config{KeepAliveInterval: 100 * time.Millisecond, KeepAliveTimeout: time.Second})
	sa, sb := openPair(t, cli, srv)
	data := randomBytes(t, 512<<10)
	go func() { assert.NoError(t, sendAll(sa, data)) }()
	got, err := io.ReadAll(sb)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got), "%d bytes of %d", len(got), len(data))
	require.False(t, srv.IsClosed(), "session ended: %v", srv.Err())
}

// TestSmallWritesMemory: small Writes on a busy connection are copied and
// queued without waiting; many of them must not pin a buffer each.
func TestSmallWritesMemory(t *testing.T) {
	const writes = 200_000
	c1, c2 := tcpConns(t)
	cc := &countingConn{Conn: c1}
	cli, srv := newPair(t, cc, c2, Config{}, Config{})
	require.Eventually(t, func() bool { return cli.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	st, peer := openPair(t, cli, srv)
	other, _ := openPair(t, cli, srv)

	held, release := cc.hold()
	defer release()
	go func() { _, _ = other.Write([]byte("busy")) }()
	<-held
	before := heapInUse()
	for i := range writes {
		_, err := st.Write([]byte{byte(i)})
		require.NoError(t, err)
	}
	grown := heapInUse() - before
	t.Logf("%d one-byte writes queued: heap +%d KiB", writes, grown>>10)
	require.Less(t, grown, int64(8<<20), "queued small writes pin too much memory")
	release()

	got := make([]byte, writes)
	_, err := io.ReadFull(peer, got)
	require.NoError(t, err)
	for i, b := range got {
		if b != byte(i) {
			require.Failf(t, "corrupt", "byte %d is %d, want %d", i, b, byte(i))
		}
	}
}

// TestKeepAliveBehindOwnData: a session that uploads many small streams
// over a slow link, with nothing coming back (the streams are too small
// for window updates, the peer does not write), is alive while the peer
// takes its data, although its pings wait behind that data for longer
// than KeepAliveTimeout. (Over a pipe the peer taking data is a write
// returning; over TCP it is the peer's acknowledgements: TestPeerTookTCP.)
func TestKeepAliveBehindOwnData(t *testing.T) {
	t.Parallel()                       // it mostly waits for its slow reader
	const streams, size = 16, 16 << 10 // 4s at the link's rate
	c1, c2 := net.Pipe()
	cli, srv := newPair(t, c1, throttle(c2, 64<<10, 4<<10),
		Config{KeepAliveInterval: 100 * time.Millisecond, KeepAliveTimeout: time.Second}, Config{})
	uploads(t, cli, srv, streams, size)
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
}

// TestPeerTookTCP: over TCP, the keepalive's sign that the peer takes our
// data is what its TCP acknowledged.
func TestPeerTookTCP(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	_, ok := tcpBytesAcked(cli.tcp)
	require.True(t, ok, "no TCP_INFO")
	sa, sb := openPair(t, cli, srv)
	before := cli.peerTook()
	data := randomBytes(t, 1<<20)
	go func() { _, _ = sa.Write(data) }()
	_, err := io.ReadFull(sb, make([]byte, len(data)))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return cli.peerTook() >= before+uint64(len(data)) }, 5*time.Second, time.Millisecond)
}

// TestConcurrentReadsWake: every one of several Reads waiting on a stream
// returns at its deadline, and at its reset, not just the first.
func TestConcurrentReadsWake(t *testing.T) {
	for _, end := range []string{"deadline", "reset"} {
		t.Run(end, func(t *testing.T) {
			cli, srv := pipePair(t, Config{})
			sa, sb := openPair(t, cli, srv)
			const readers = 8
			errs := make(chan error, readers)
			for range readers {
				go func() {
					_, err := sb.Read(make([]byte, 1))
					errs <- err
				}()
			}
			if end == "deadline" {
				require.NoError(t, sb.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
			} else {
				require.NoError(t, sa.Reset())
			}
			for range readers {
				select {
				case err := <-errs:
					if end == "deadline" {
						require.ErrorIs(t, err, os.ErrDeadlineExceeded)
					} else {
						requireReset(t, err)
					}
				case <-testCtx(t).Done():
					t.Fatal("a Read is still waiting")
				}
			}
		})
	}
}

// TestTakeBatch: a batch takes every control and small frame, and large
// data frames up to its budget; the rest waits, with every later frame
// of its stream, and SYNs keep their order.
func TestTakeBatch(t *testing.T) {
	big := make([]byte, 300<<10)
	data := func(id uint32, flags uint16, b []byte) frame {
		return frame{header: header{typ: typeData, flags: flags, id: id}, data: b}
	}
	ctl := func(id uint32, flags uint16) frame {
		return frame{header: header{typ: typeWindowUpdate, flags: flags, id: id}}
	}
	s := &Session{queue: []frame{
		data(1, 0, big), data(3, 0, big), // the budget's worth
		data(5, 0, big),          // held back
		data(7, 0, []byte("hi")), // small: taken
		ctl(5, flagFIN),          // after 5's held data: held
		ctl(3, flagFIN),          // after 3's taken data: taken
		data(9, flagSYN, big),    // a held SYN...
		ctl(11, flagSYN),         // ...holds the SYNs after it
		{header: header{typ: typePing, flags: flagSYN}}, // taken
	}}
	batch := s.takeLocked(nil)
	ids := func(fs []frame) (out []string) {
		for _, f := range fs {
			out = append(out, fmt.Sprintf("%d/%d/%#x", f.id, f.typ, f.flags))
		}
		return out
	}
	require.Equal(t, []string{"1/0/0x0", "3/0/0x0", "7/0/0x0", "3/1/0x4", "0/2/0x1"}, ids(batch))
	require.Equal(t, []string{"5/0/0x0", "5/1/0x4", "9/0/0x1", "11/1/0x1"}, ids(s.queue))
	require.Equal(t, []string{"5/0/0x0", "5/1/0x4", "9/0/0x1", "11/1/0x1"}, ids(s.takeLocked(nil)[:4]))
	require.Empty(t, s.queue)
}

// TestSmallFrameOvertakesBulk: a small message queued behind several
// streams' bulk data on a slow link waits behind one batch of it, not
// behind all of it.
func TestSmallFrameOvertakesBulk(t *testing.T) {
	const bulk, size = 8, 256 << 10
	c1, c2 := tcpConns(t)
	smallBuffers(t, 16<<10, c1, c2)
	g := gate(throttle(c2, 4<<20, 16<<10)) // a slow link, and a peer that stops reading
	cli, srv := newPair(t, c1, g, Config{}, Config{})
	filler, fillerPeer := openPair(t, cli, srv)
	msg, msgPeer := openPair(t, cli, srv)
	var peers []*Stream
	var streams []*Stream
	for range bulk {
		a, b := openPair(t, cli, srv)
		streams, peers = append(streams, a), append(peers, b)
	}
	g.shut()
	go func() { _, _ = filler.Write(make([]byte, size)) }()
	require.Eventually(t, func() bool { return stuck(cli, filler) }, 5*time.Second, time.Millisecond)
	for _, st := range streams {
		go func() { _, _ = st.Write(make([]byte, size)) }()
	}
	require.Eventually(t, func() bool { return queuedWrites(cli) == bulk }, 5*time.Second, time.Millisecond)
	_, err := msg.Write([]byte("hello"))
	require.NoError(t, err)

	for _, p := range append(peers, fillerPeer) {
		go func() { _, _ = io.Copy(io.Discard, p) }()
	}
	before := srv.bytesIn.Load()
	g.reopen()
	_, err = io.ReadFull(msgPeer, make([]byte, 5))
	require.NoError(t, err)
	behind := srv.bytesIn.Load() - before
	t.Logf("the message came after %d KiB", behind>>10)
	// The filler's rest and one batch of bulk data (its last frame may
	// pass the budget), with some slack; not all eight streams' data.
	require.Less(t, behind, uint64(size+batchBudget+size+size/2), "the message waited behind all the bulk data")
}

// TestSmallFrameOnSlowLink: on a link that carries half a megabyte a
// second, a small message waits behind about batchTime of bulk data, not
// behind a whole Write (256 KiB) or batch (512 KiB) of it: the writer
// measures the link and splits large frames to its pace.
func TestSmallFrameOnSlowLink(t *testing.T) {
	cli, srv, msg, msgPeer, _ := slowLink(t, 512<<10, true)
	waitPaced(t, cli) // until then, one batch is a whole budget

	most := worstMessageWait(t, srv, msg, msgPeer, 5)
	t.Logf("a message came after %d KiB at most", most>>10)
	// The socket buffers (32 KiB), the throttle's chunk and a batch or two
	// of about 25 KiB; not a 256 KiB Write.
	require.Less(t, most, uint64(160<<10), "the message waited behind a whole bulk Write")
}

// TestLargerMessageOnSlowLink: a message too large to be a small frame
// (16 KiB, a page of a query's result) does not wait for the bulk
// streams' Writes queued before it (three of 256 KiB, 1.5 s at half a
// megabyte a second): each batch serves the streams that were served the
// least, so the message's stream, idle until then, goes in the next one.
func TestLargerMessageOnSlowLink(t *testing.T) {
	const size = 16 << 10
	cli, srv, msg, msgPeer, _ := slowLink(t, 512<<10, true)
	waitPaced(t, cli)

	most := worstMessageWait(t, srv, msg, msgPeer, size)
	t.Logf("a message of %d KiB came after %d KiB at most", size>>10, most>>10)
	// As for a small message, plus the message itself and a batch for
	// each bulk stream; not the bulk Writes queued before it.
	require.Less(t, most, uint64(160<<10+size+3*32<<10), "the message waited behind the bulk Writes queued before it")
}

// TestKernelQueueOnSlowLink: on a slow link whose sender keeps the
// kernel's autotuned send buffer, the kernel takes every stream's window
// without the writer waiting, and a small message waited behind all of
// it (768 KiB, 3 s at 256 KiB/s). The pacer measures the link by what the
// peer acknowledges and holds the socket's unsent bytes to two batches:
// the message overtakes the bulk data in the writer's queue, and the bulk
// streams still fill the link.
func TestKernelQueueOnSlowLink(t *testing.T) {
	const rate = 256 << 10
	cli, srv, msg, msgPeer, _ := slowLink(t, rate, false)
	waitPaced(t, cli)

	start, begin := srv.bytesIn.Load(), time.Now()
	most := worstMessageWait(t, srv, msg, msgPeer, 5)
	carried := float64(srv.bytesIn.Load()-start) / time.Since(begin).Seconds()
	t.Logf("a message came after %d KiB at most; the link carried %.0f KiB/s", most>>10, carried/1024)
	// The peer's buffer, the throttle's chunk, the bytes in flight, the
	// socket's unsent bytes and a batch or two (160-220 KiB): well under
	// the streams' windows.
	require.Less(t, most, uint64(384<<10), "the message waited behind the kernel's queue")
	require.Greater(t, carried, 0.5*rate, "the bulk streams no longer fill the link")
}

// TestPacerIgnoresIdleGaps: bursts of bulk data with pauses between them
// on a fast link (8 MiB/s) leave data unsent at the end of each burst's
// writes, but the socket runs dry in between: the pause is the session's,
// not the link's, and the batch budget stays whole. (Measured from one
// burst's end to the next, the link would carry 1 MiB/s.)
func TestPacerIgnoresIdleGaps(t *testing.T) {
	c1, c2 := tcpConns(t)
	smallBuffers(t, 16<<10, c2) // the link's buffer; c1's is the kernel's
	cli, srv := newPair(t, c1, throttle(c2, 8<<20, 64<<10), Config{}, Config{})
	st, peer := openPair(t, cli, srv)
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	burst := make([]byte, 256<<10)
	for range 8 {
		_, err := st.Write(burst)
		require.NoError(t, err)
		require.Equal(t, batchBudget, cli.pace.budget(), "a pause between bursts lowered the batch budget")
		time.Sleep(2 * paceWindow) // the session pauses; the link does not
	}
}

// TestCloseOnPacedLink: a session's Close writes its GoAway within
// goAwayWait. On a paced slow link the writer may be in the middle of a
// batch that the socket takes at the pace only (TCP_NOTSENT_LOWAT): the
// closing session gives the socket's queue back to the kernel, and the
// peer sees the GoAway, not the connection's end. (The pending Write
// fails, and the rest of its data is dropped, as on any Close.)
//
// The peer keeps sending meanwhile, as a busy peer does: the GoAway, still
// in the closing socket's queue when the session closes, must not be
// discarded by a reset that the peer's data would provoke at a socket
// closed with data unsent (see Session.linger).
func TestCloseOnPacedLink(t *testing.T) {
	cli, srv, msg, msgPeer, stopBulk := slowLink(t, 256<<10, false)
	waitPaced(t, cli)
	stopBulk()
	talk, talkPeer := openPair(t, srv, cli)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { keepWriting(ctx, talk) })
	wg.Go(func() { _, _ = io.Copy(io.Discard, talkPeer) })
	context.AfterFunc(ctx, func() { talk.Reset() })
	data := randomBytes(t, 256<<10)
	wrote := make(chan error, 1)
	go func() {
		_, err := msg.Write(data)
		wrote <- err
	}()
	require.Eventually(t, func() bool { return queuedBytes(cli) >= 64<<10 }, 5*time.Second, time.Millisecond,
		"the Write waits in the writer's queue")
	require.NoError(t, cli.Close())
	<-wrote // an error: the stream ended with its session
	got, _ := io.ReadAll(msgPeer)
	<-srv.CloseChan()
	require.ErrorIs(t, srv.Err(), ErrRemoteGoAway, "the closing session's GoAway was not written (the client: %v)", cli.Err())
	require.True(t, bytes.HasPrefix(data, got), "the %d bytes that came are not what was written", len(got))
}

// TestCloseDropsUnfinishedData: a session's Close does not write what is
// queued for a stream with no FIN queued (the peer would drop it on the
// GoAway, which would wait behind it on a slow link); a stream whose FIN is
// queued keeps its data and FIN, and control frames stay. The writer is
// held (as by a Write that owns the connection) while the queue is made.
func TestCloseDropsUnfinishedData(t *testing.T) {
	cli, srv := tcpPair(t, Config{})
	data := func(id uint32, flags uint16, n int) frame {
		return frame{header: header{typ: typeData, id: id, flags: flags}, data: make([]byte, n)}
	}
	cli.sendMu.Lock()
	cli.owned = true
	cli.queue = append(cli.queue,
		data(101, 0, 64<<10), // unfinished
		data(103, 0, 1000),   // finished: its data and FIN go
		frame{header: header{typ: typeWindowUpdate, id: 105, length: 1 << 20}},
		data(101, 0, 64<<10),
		frame{header: header{typ: typeWindowUpdate, id: 103, flags: flagFIN}}, // as CloseWrite queues it
	)
	cli.sendMu.Unlock()

	cli.shutdown(ErrSessionClosed, true, goAwayNormal)
	cli.sendMu.Lock()
	var left []header
	for _, f := range cli.queue {
		left = append(left, f.header)
	}
	cli.sendMu.Unlock()
	assert.Equal(t, []header{
		{typ: typeData, id: 103},
		{typ: typeWindowUpdate, id: 105, length: 1 << 20},
		{typ: typeWindowUpdate, id: 103, flags: flagFIN},
		{typ: typeGoAway, length: goAwayNormal},
	}, left)

	cli.release(nil) // the writer writes what is left
	<-srv.CloseChan()
	require.ErrorIs(t, srv.Err(), ErrRemoteGoAway)
}

// queuedBytes returns the data bytes waiting in s's send queue.
func queuedBytes(s *Session) int {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	n := 0
	for _, f := range s.queue {
		n += f.payloadLen()
	}
	return n
}

// waitPaced waits until cli's pacer has measured a slow link and the
// socket's queue has drained to the pace.
func waitPaced(t *testing.T, cli *Session) {
	require.Eventually(t, func() bool { return cli.pace.budget() < batchBudget }, 10*time.Second, time.Millisecond,
		"the writer measures the slow link")
	// What the kernel took before the measurement drains.
	require.Eventually(t, func() bool {
		info, ok := tcpInfo(cli.tcp)
		return ok && int(info.Notsent_bytes) <= 3*cli.pace.budget()
	}, 10*time.Second, time.Millisecond, "the socket's queue is held to the pace")
}

// slowLink returns a session pair over a TCP link that the server reads
// at rate bytes a second, with three bulk streams writing to it until the
// test ends or stopBulk resets them, and a stream pair for messages. The
// link's buffer is small; the sender's is too with smallSender, else the
// kernel's own.
func slowLink(t *testing.T, rate int, smallSender bool) (cli, srv *Session, msg, msgPeer *Stream, stopBulk func()) {
	c1, c2 := tcpConns(t)
	smallBuffers(t, 16<<10, c2)
	if smallSender {
		smallBuffers(t, 16<<10, c1)
	}
	cli, srv = newPair(t, c1, throttle(c2, rate, 16<<10), Config{}, Config{})
	msg, msgPeer = openPair(t, cli, srv)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	stopBulk = func() {
		cancel()
		wg.Wait()
	}
	t.Cleanup(stopBulk)
	for range 3 {
		st, peer := openPair(t, cli, srv)
		wg.Go(func() { keepWriting(ctx, st) })
		wg.Go(func() { _, _ = io.Copy(io.Discard, peer) })
		context.AfterFunc(ctx, func() { st.Reset() })
	}
	return cli, srv, msg, msgPeer, stopBulk
}

// worstMessageWait sends five messages of size bytes one after another
// and returns the most bytes srv read between a message's Write and its
// arrival.
func worstMessageWait(t *testing.T, srv *Session, msg, msgPeer *Stream, size int) uint64 {
	var most uint64
	got := make([]byte, size)
	for i := range 5 {
		sent := bytes.Repeat([]byte{byte('a' + i)}, size)
		before := srv.bytesIn.Load()
		_, err := msg.Write(sent)
		require.NoError(t, err)
		_, err = io.ReadFull(msgPeer, got)
		require.NoError(t, err)
		require.Equal(t, sent, got)
		most = max(most, srv.bytesIn.Load()-before)
	}
	return most
}

// descheduledConn takes delay over each Write, as a writer's thread does
// when a busy host deschedules it mid-write; its socket, reached through
// NetConn, keeps up with everything.
type descheduledConn struct {
	net.Conn
	delay time.Duration
}

func (c *descheduledConn) Write(b []byte) (int, error) {
	time.Sleep(c.delay)
	return c.Conn.Write(b)
}

func (c *descheduledConn) NetConn() net.Conn { return c.Conn }

// TestPacerIgnoresBusyHost: small writes that take long while the link
// keeps up (nothing waits in the socket) measure the host's CPU, not the
// link: the batch budget stays whole, and bulk data is not cut into
// small batches, which would only cost more CPU where CPU is short.
func TestPacerIgnoresBusyHost(t *testing.T) {
	c1, c2 := tcpConns(t)
	cli, srv := newPair(t, &descheduledConn{Conn: c1, delay: 5 * time.Millisecond}, c2, Config{}, Config{})
	st, peer := openPair(t, cli, srv)
	msg, got := []byte("ping"), make([]byte, 4)
	// Each message is a batch of its own: 5 ms for 4 bytes, a link of
	// 800 B/s by the clock, over several of the pacer's measurements.
	for start := time.Now(); time.Since(start) < 4*paceWindow; {
		_, err := st.Write(msg)
		require.NoError(t, err)
		_, err = io.ReadFull(peer, got)
		require.NoError(t, err)
		require.Equal(t, batchBudget, cli.pace.budget(), "a busy host's slow writes lowered the batch budget")
	}
}

// TestDeadlineAfterSplitHead: once the writer has sent the head of a
// Write's frame (split on a slow link), the write deadline cannot withdraw
// the rest: the peer has part of it, so Write must count it all. The peer
// gets exactly the bytes that Writes report written.
func TestDeadlineAfterSplitHead(t *testing.T) {
	c1, c2 := tcpConns(t)
	smallBuffers(t, 16<<10, c1, c2)
	cli, srv := newPair(t, c1, throttle(c2, 512<<10, 16<<10), Config{}, Config{})
	filler, fillerPeer := openPair(t, cli, srv)
	st, peer := openPair(t, cli, srv)
	go func() { _, _ = io.Copy(io.Discard, fillerPeer) }()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go keepWriting(ctx, filler)
	context.AfterFunc(ctx, func() { filler.Reset() })
	require.Eventually(t, func() bool { return cli.pace.budget() <= 32<<10 }, 10*time.Second, time.Millisecond,
		"the writer measures the slow link")

	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(i * 7 / 5)
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	sent, timedOut := 0, 0
	for range 12 {
		require.NoError(t, st.SetWriteDeadline(time.Now().Add(30*time.Millisecond)))
		n, err := st.Write(data[sent : sent+128<<10])
		sent += n
		if err != nil {
			require.ErrorIs(t, err, os.ErrDeadlineExceeded)
			timedOut++
		}
	}
	require.NoError(t, st.SetWriteDeadline(time.Time{}))
	require.NoError(t, st.CloseWrite())
	t.Logf("%d KiB written, %d Writes timed out", sent>>10, timedOut)
	b := <-got
	require.Equal(t, sent, len(b), "the peer got other bytes than Writes reported")
	require.True(t, bytes.Equal(data[:sent], b), "the peer got other bytes than written")
}

// TestStalledWhileWriteWaits: Stalled says how long a write has waited
// without progress (the peer stopped reading here), and drops to zero once
// the connection takes data again.
func TestStalledWhileWriteWaits(t *testing.T) {
	cli, srv, g := gatedPair(t, Config{})
	st, peer := openPair(t, cli, srv)
	require.Zero(t, cli.Stalled())
	g.shut()
	wrote := make(chan error, 1)
	go func() {
		_, err := st.Write(make([]byte, 256<<10))
		wrote <- err
	}()
	require.Eventually(t, func() bool { return cli.Stalled() > 300*time.Millisecond }, 5*time.Second, time.Millisecond)
	g.reopen()
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	require.NoError(t, <-wrote)
	require.Zero(t, cli.Stalled(), "no write waits")
}

// TestSplitRestGivesWayToReset: a Write whose frame was split, its head
// taken and its deadline passed, waits for its rest to be written; a Reset
// or the session's end drops the rest, and the Write ends as soon as the
// writer is done with the head, which uses the Write's buffer (before, the
// Write waited for the whole rest, and for ever after Close).
func TestSplitRestGivesWayToReset(t *testing.T) {
	for _, end := range []string{"reset", "close"} {
		t.Run(end, func(t *testing.T) {
			cli, srv, g := gatedPair(t, Config{WriteTimeout: time.Minute})
			st, _ := openPair(t, cli, srv)
			cli.pace.limit.Store(minBatchBudget) // a slow link, measured
			g.shut()
			require.NoError(t, st.SetWriteDeadline(time.Now().Add(300*time.Millisecond)))
			wrote := make(chan error, 1)
			go func() {
				_, err := st.Write(make([]byte, 200<<10))
				wrote <- err
			}()
			require.Eventually(t, func() bool { return splitRestQueued(cli, st) }, 5*time.Second, time.Millisecond)
			select {
			case err := <-wrote:
				require.FailNow(t, "the Write ended with its rest queued", "err: %v", err)
			case <-time.After(500 * time.Millisecond): // past the deadline
			}
			if end == "reset" {
				require.NoError(t, st.Reset())
				select {
				case err := <-wrote:
					require.FailNow(t, "the Write ended while the writer still had its head", "err: %v", err)
				case <-time.After(300 * time.Millisecond):
				}
				g.reopen() // the head goes out; the rest does not
			} else {
				require.NoError(t, cli.Close()) // cuts the head's write short
			}
			select {
			case err := <-wrote:
				require.ErrorIs(t, err, ErrStreamReset)
			case <-time.After(5 * time.Second):
				require.FailNow(t, "the Write still waits for its rest")
			}
			g.reopen()
		})
	}
}

// splitRestQueued reports whether the rest of a split frame of st's waits
// in s's queue.
func splitRestQueued(s *Session, st *Stream) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for _, f := range s.queue {
		if f.owner == st && f.started {
			return true
		}
	}
	return false
}

// TestSlowReaderIsProgress: a peer that reads steadily but slowly, behind
// a large send buffer, wakes our writer only now and then (the kernel
// wakes it once a third of the buffer drained), for longer than the write
// timeout; the bytes it acknowledges meanwhile are progress, so the
// session neither ends nor looks stalled.
func TestSlowReaderIsProgress(t *testing.T) {
	c1, c2 := tcpConns(t)
	// 1 MiB (the kernel doubles it): a third of it takes 2.7 s to drain,
	// longer than the write timeout.
	require.NoError(t, c1.(*net.TCPConn).SetWriteBuffer(512<<10))
	cli, srv := newPair(t, c1, throttle(c2, 128<<10, 4<<10), Config{WriteTimeout: 2 * time.Second}, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		cli.Close()
		srv.Close()
		wg.Wait()
	})
	var streams, peers []*Stream
	for range 8 { // more in their windows than the buffer holds
		st, peer := openPair(t, cli, srv)
		streams, peers = append(streams, st), append(peers, peer)
	}
	for i, st := range streams {
		peer := peers[i]
		wg.Go(func() { keepWriting(ctx, st) })
		wg.Go(func() { _, _ = io.Copy(io.Discard, peer) })
	}
	var most time.Duration
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end) && !cli.IsClosed(); {
		most = max(most, cli.Stalled())
		time.Sleep(10 * time.Millisecond) // sampling, not synchronisation
	}
	t.Logf("%d KiB read; a write waited %v at most without progress", srv.bytesIn.Load()>>10, most)
	require.False(t, cli.IsClosed(), "the session ended: %v", cli.Err())
	require.Less(t, most, 1500*time.Millisecond, "a steadily read session looked stalled")
}

// keepWriting writes 256 KiB at a time on st until ctx is done or a Write
// fails.
func keepWriting(ctx context.Context, st *Stream) {
	buf := make([]byte, 256<<10)
	for ctx.Err() == nil {
		if _, err := st.Write(buf); err != nil {
			return
		}
	}
}

// TestRetransmitCapFollowsRoundTrip: the cap on a TCP connection's
// retransmission timeout is twice the timeout the kernel computes from the
// round trip, and at least 2s. A link whose round trip grows to seconds
// (a deep queue) gets a higher cap, so that the cap causes no spurious
// retransmissions there, and the cap comes down with the round trip.
func TestRetransmitCapFollowsRoundTrip(t *testing.T) {
	var caps []time.Duration
	var info tcpPace
	p := pacer{
		tcp:    func() (tcpPace, bool) { return info, true },
		capRTO: func(d time.Duration) { caps = append(caps, d) },
		rtoCap: minRetransmitCap,
	}
	now := time.Now()
	for _, rto := range []time.Duration{
		300 * time.Millisecond, // a WAN link: the floor, as set at the start
		1600 * time.Millisecond,
		1700 * time.Millisecond, // the same whole seconds: no change
		90 * time.Second,        // the kernel's ceiling
		200 * time.Millisecond,
	} {
		info.rto = rto
		now = now.Add(paceWindow)
		p.sample(now)
	}
	assert.Equal(t, []time.Duration{4 * time.Second, 120 * time.Second, 2 * time.Second}, caps)
}
