package mux

import (
	"bytes"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sessionBuffered returns the received data s holds unread, as the
// session counts it and as its streams' queues add up.
func sessionBuffered(s *Session, streams []*Stream) (counted, queued int64) {
	for _, st := range streams {
		_, _, b := streamState(st)
		queued += int64(b)
	}
	return s.mem.buffered.Load(), queued
}

// TestBudgetHostileStreams: a member opens 2,000 streams and sends each
// one's whole initial window, and nothing reads them. The session holds
// at most MaxBuffered of it; the streams past it are reset (the opener
// sees the reset) and counted; the session carries on: the streams it kept
// deliver their data intact, a stream the other way works throughout, and
// new streams work once the kept ones are read.
func TestBudgetHostileStreams(t *testing.T) {
	const (
		streams = 2000
		budget  = 4 << 20
		kept    = budget / initialWindow
	)
	leaks := leakCheck(t)
	c1, c2 := tcpConns(t)
	cli, srv := newPair(t, c1, c2,
		Config{MaxPendingOpens: 4096},
		Config{MaxBuffered: budget, AcceptBacklog: 4096})
	ctx := testCtx(t)
	back, backPeer := openPair(t, srv, cli) // the other way

	before := heapInUse()
	accepted := make(chan *Stream, streams)
	go func() {
		for range streams {
			st, err := srv.AcceptStream(ctx)
			if err != nil {
				return
			}
			accepted <- st // and never read
		}
	}()
	payload := randomBytes(t, initialWindow)
	opened := make([]*Stream, streams)
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			st, err := cli.OpenStream(ctx)
			if !assert.NoError(t, err) {
				return
			}
			opened[i] = st
			// The write is taken whole before any reset comes back.
			if _, err := st.Write(payload); err != nil {
				assert.ErrorIs(t, err, ErrStreamReset)
			}
		})
	}
	// While the flood goes on, the stream the other way carries data.
	backData := randomBytes(t, 1<<20)
	backDone := make(chan error, 1)
	go func() { backDone <- sendAll(back, backData) }()
	got, err := io.ReadAll(readOnly{backPeer})
	require.NoError(t, err)
	require.True(t, bytes.Equal(backData, got), "the other way's data")
	require.NoError(t, <-backDone)
	wg.Wait()

	var in []*Stream
	for range streams {
		select {
		case st := <-accepted:
			in = append(in, st)
		case <-ctx.Done():
			t.Fatalf("accepted %d streams of %d", len(in), streams)
		}
	}
	// Every stream's data is in: held, or its stream reset.
	require.Eventually(t, func() bool { return srv.Stats().BytesReceived == streams*initialWindow },
		10*time.Second, time.Millisecond)
	grown := heapInUse() - before
	counted, queued := sessionBuffered(srv, in)
	refused := srv.LimitStats().RefusedMemory
	t.Logf("held %d KiB, refused %d streams, heap +%d KiB", counted>>10, refused, grown>>10)
	require.Equal(t, queued, counted, "the session's count is its streams' sum")
	require.LessOrEqual(t, counted, int64(budget))
	require.Greater(t, counted, int64(budget-initialWindow), "the budget is used")
	require.GreaterOrEqual(t, refused, uint64(streams-kept))
	require.Less(t, grown, int64(budget+16<<20), "memory beyond the budget")

	// The opener sees exactly the refused streams reset.
	require.Eventually(t, func() bool {
		n := 0
		for _, st := range opened {
			st.mu.Lock()
			if st.state&stReadReset != 0 {
				n++
			}
			st.mu.Unlock()
		}
		return uint64(n) == refused
	}, 10*time.Second, time.Millisecond)
	var keptIn []*Stream
	for _, st := range in {
		if _, _, b := streamState(st); b > 0 {
			keptIn = append(keptIn, st)
			continue
		}
		_, err := st.Read(make([]byte, 1))
		require.ErrorIs(t, err, ErrStreamReset)
		require.ErrorContains(t, err, "MaxBuffered")
	}
	require.Equal(t, int64(len(keptIn)*initialWindow), counted, "kept streams hold all they got")
	require.False(t, srv.IsClosed(), "session ended: %v", srv.Err())

	// The kept streams deliver their data; the budget is free again, and
	// a new stream carries more than the budget.
	for _, st := range keptIn {
		b := make([]byte, initialWindow)
		_, err := io.ReadFull(st, b)
		require.NoError(t, err)
		require.True(t, bytes.Equal(payload, b))
	}
	require.Zero(t, srv.mem.buffered.Load())
	sa, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	more := randomBytes(t, 2*budget)
	go func() { assert.NoError(t, sendAll(sa, more)) }()
	sb, err := srv.AcceptStream(ctx)
	require.NoError(t, err)
	got, err = io.ReadAll(readOnly{sb})
	require.NoError(t, err)
	require.True(t, bytes.Equal(more, got), "a new stream's data")
	require.Equal(t, refused, srv.LimitStats().RefusedMemory, "no more resets")

	cli.Close()
	srv.Close()
	leaks()
}

// TestBudgetCompliantBulk: bulk streams whose readers keep up grow their
// windows, then their readers stall: the session's budget stops the
// windows' growth early enough that what the senders may then send fits,
// so no stream is reset, and every byte arrives once the readers go on.
func TestBudgetCompliantBulk(t *testing.T) {
	const (
		streams = 8
		budget  = 8 << 20 // a quarter is the streams' initial windows
		size    = 6 << 20
		fast    = 3 << 20 // read at once; the rest after the stall
	)
	cli, srv := tcpPair(t, Config{MaxBuffered: budget})
	// As in TestWindowGrowth: every window update counts as fast, so the
	// windows grow as far as the budget lets them.
	require.Eventually(t, func() bool { return srv.rtt.Load() > 0 }, 5*time.Second, time.Millisecond)
	srv.rtt.Store(int64(time.Second))

	type pair struct {
		sa, sb *Stream
		data   []byte
	}
	pairs := make([]pair, streams)
	var wg sync.WaitGroup
	for i := range pairs {
		p := &pairs[i]
		p.sa, p.sb = openPair(t, cli, srv)
		p.data = randomBytes(t, size)
		wg.Go(func() { assert.NoError(t, sendAll(p.sa, p.data)) })
	}
	var read sync.WaitGroup
	gate := make(chan struct{})
	got := make([][]byte, streams)
	for i := range pairs {
		p := &pairs[i]
		read.Add(1)
		wg.Go(func() {
			got[i] = make([]byte, size)
			_, err := io.ReadFull(p.sb, got[i][:fast])
			read.Done()
			if !assert.NoError(t, err) {
				return
			}
			<-gate // the reader stalls
			_, err = io.ReadFull(p.sb, got[i][fast:])
			assert.NoError(t, err)
		})
	}
	read.Wait()
	// Every sender fills what its window allows (or is reset).
	require.Eventually(t, func() bool {
		if srv.LimitStats().RefusedMemory > 0 {
			return true
		}
		for _, p := range pairs {
			if !stalled(p.sa) {
				return false
			}
		}
		return true
	}, 10*time.Second, time.Millisecond)
	var wins int64
	in := make([]*Stream, streams)
	for i, p := range pairs {
		in[i] = p.sb
		_, w, _ := streamState(p.sb)
		wins += int64(w)
	}
	counted, queued := sessionBuffered(srv, in)
	t.Logf("windows %d KiB in all, %d KiB held", wins>>10, counted>>10)
	require.Zero(t, srv.LimitStats().RefusedMemory, "compliant streams reset")
	require.Equal(t, queued, counted)
	require.Greater(t, wins, int64(streams*initialWindow), "the windows grew")
	require.LessOrEqual(t, wins, int64(streams*initialWindow+budget/4), "the windows stopped growing")
	require.Zero(t, srv.LimitStats().RefusedMemory)
	close(gate)
	wg.Wait()
	for i, p := range pairs {
		require.True(t, bytes.Equal(p.data, got[i]), "stream %d's data", i)
	}
	require.Zero(t, srv.LimitStats().RefusedMemory)
}

// TestBudgetAccounting: however received data leaves a stream (Read,
// WriteTo to a socket or not, Close, Reset, the peer's reset, the
// session's end), the session's count of unread data goes back to what
// its streams hold.
func TestBudgetAccounting(t *testing.T) {
	const size = 3 * initialWindow / 2
	for _, tc := range []struct {
		name    string
		consume func(t *testing.T, sa, sb *Stream)
	}{
		{"read", func(t *testing.T, _, sb *Stream) {
			_, err := io.Copy(io.Discard, readOnly{sb})
			require.NoError(t, err)
		}},
		{"WriteTo", func(t *testing.T, _, sb *Stream) {
			_, err := sb.WriteTo(io.Discard)
			require.NoError(t, err)
		}},
		{"WriteTo a socket", func(t *testing.T, _, sb *Stream) {
			a, b := sockPair(t) // spliced
			defer a.Close()
			defer b.Close()
			done := make(chan error, 1)
			go func() {
				_, err := io.Copy(io.Discard, b)
				done <- err
			}()
			_, err := sb.WriteTo(a)
			require.NoError(t, err)
			require.NoError(t, a.CloseWrite())
			require.NoError(t, <-done)
		}},
		{"close", func(t *testing.T, _, sb *Stream) { require.NoError(t, sb.Close()) }},
		{"reset", func(t *testing.T, _, sb *Stream) { require.NoError(t, sb.Reset()) }},
		{"peer's reset", func(t *testing.T, sa, sb *Stream) {
			require.NoError(t, sa.Reset())
			_, err := io.Copy(io.Discard, readOnly{sb})
			if err != nil {
				require.ErrorIs(t, err, ErrStreamReset)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, srv := tcpPair(t, Config{})
			sa, sb := openPair(t, cli, srv)
			data := randomBytes(t, size)
			wrote := make(chan error, 1)
			go func() { wrote <- sendAll(sa, data) }()
			if tc.name != "read" && tc.name != "WriteTo" && tc.name != "WriteTo a socket" {
				// Let the window's worth arrive first.
				require.Eventually(t, func() bool { return srv.mem.buffered.Load() == initialWindow-1 },
					5*time.Second, time.Millisecond)
			}
			tc.consume(t, sa, sb)
			<-wrote
			require.Eventually(t, func() bool {
				counted, queued := sessionBuffered(srv, []*Stream{sb})
				return counted == queued && counted == 0
			}, 5*time.Second, time.Millisecond)
		})
	}
	t.Run("session end", func(t *testing.T) {
		cli, srv := tcpPair(t, Config{})
		sa, _ := openPair(t, cli, srv)
		wrote := make(chan error, 1)
		go func() { wrote <- sendAll(sa, make([]byte, size)) }()
		require.Eventually(t, func() bool { return srv.mem.buffered.Load() == initialWindow-1 },
			5*time.Second, time.Millisecond)
		require.NoError(t, srv.Close())
		require.Zero(t, srv.mem.buffered.Load())
		require.ErrorIs(t, <-wrote, ErrStreamReset)
	})
}
