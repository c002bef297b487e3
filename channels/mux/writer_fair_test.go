package mux

import (
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFairShares: when the large frames queued exceed a batch's budget,
// the streams take turns, whatever the order of their Writes; a stream
// that was idle goes in the next batch, ahead of the bulk Writes queued
// before it; and every byte is taken once, in each stream's order.
func TestFairShares(t *testing.T) {
	const budget = 32 << 10
	s := &Session{}
	s.pace.limit.Store(budget) // a slow link
	bulkA, bulkB, msg := &Stream{id: 1}, &Stream{id: 3}, &Stream{id: 5}
	sent := map[uint32][]byte{}
	write := func(st *Stream, n int) {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(int(st.id) + i*7)
		}
		sent[st.id] = append(sent[st.id], b...)
		s.queue = append(s.queue, frame{header: header{typ: typeData, id: st.id}, data: b, owner: st})
	}
	got := map[uint32][]byte{}
	batch := func() map[uint32]int {
		took := map[uint32]int{}
		for _, f := range s.takeLocked(nil) {
			got[f.id] = append(got[f.id], f.payload()...)
			took[f.id] += f.payloadLen()
		}
		return took
	}

	write(bulkA, 256<<10)
	write(bulkB, 256<<10)
	for i := range 6 {
		took := batch()
		turn := bulkA.id
		if i%2 == 1 {
			turn = bulkB.id
		}
		require.Equal(t, map[uint32]int{turn: budget}, took, "batch %d", i)
	}

	write(msg, 16<<10)
	took := batch()
	assert.Equal(t, 16<<10, took[msg.id], "the message waited behind the bulk Writes queued before it")
	assert.Equal(t, budget, took[bulkA.id]+took[bulkB.id]+took[msg.id], "the batch did not take its budget")

	for len(s.queue) > 0 {
		batch()
	}
	for id, b := range sent {
		assert.Equal(t, b, got[id], "stream %d's bytes", id)
	}
}

// TestFairSharesFastLink: on a fast link the batch takes large frames
// whole, smaller shares first, until the budget is spent: replies of
// 100 KiB queued together with a Write of 500 KiB do not wait for it.
func TestFairSharesFastLink(t *testing.T) {
	s := &Session{}
	sizes := []int{500 << 10, 100 << 10, 100 << 10, 100 << 10, 100 << 10, 100 << 10, 100 << 10}
	for i, n := range sizes {
		st := &Stream{id: uint32(2*i + 1)}
		s.queue = append(s.queue, frame{header: header{typ: typeData, id: st.id}, data: make([]byte, n), owner: st})
	}
	var ids []uint32
	for _, f := range s.takeLocked(nil) {
		ids = append(ids, f.id)
	}
	// Six replies pass the budget (512 KiB), the last taken whole.
	assert.Equal(t, []uint32{3, 5, 7, 9, 11, 13}, ids)
	require.Len(t, s.queue, 1)
	assert.Equal(t, uint32(1), s.queue[0].id)
}

// TestFairSharesKeepSynOrder: new streams whose first Writes are large
// (their frames carry SYN) go in stream ID order, whatever their sizes. A
// smaller later SYN frame that took the budget held the earlier one, and
// with it every later SYN (SYNs leave in ID order): every batch then took
// no large frame, and decided the same again.
func TestFairSharesKeepSynOrder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		budget int64 // 0: a fast link's
		sizes  []int
	}{
		{"fast", 0, []int{256 << 10, 200 << 10, 200 << 10, 200 << 10}},
		{"slow", 32 << 10, []int{30 << 10, 17 << 10, 17 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Session{}
			s.pace.limit.Store(tc.budget)
			for i, n := range tc.sizes {
				st := &Stream{id: uint32(2*i + 1)}
				s.queue = append(s.queue, frame{header: header{typ: typeData, id: st.id, flags: flagSYN}, data: make([]byte, n), owner: st})
			}
			var syns []uint32
			for b := 0; len(s.queue) > 0; b++ {
				require.Less(t, b, 100, "the SYN frames are stuck")
				took := s.takeLocked(nil)
				require.NotEmpty(t, took, "batch %d took nothing", b)
				for _, f := range took {
					if f.flags&flagSYN != 0 {
						syns = append(syns, f.id)
					}
				}
			}
			assert.Equal(t, []uint32{1, 3, 5, 7}[:len(tc.sizes)], syns, "the SYNs left out of order")
		})
	}
}

// TestFairSharesSynOrderOnSession: four new streams' first Writes, large
// and queued together, all complete.
func TestFairSharesSynOrderOnSession(t *testing.T) {
	cli, srv := unixPair(t, Config{})
	// A write in progress, so that the Writes queue: taken once the
	// writer is idle, or its release would end it.
	require.Eventually(t, func() bool {
		cli.sendMu.Lock()
		defer cli.sendMu.Unlock()
		if cli.owned || len(cli.queue) > 0 {
			return false
		}
		cli.owned = true
		return true
	}, 5*time.Second, time.Millisecond)
	ctx := testCtx(t)
	sizes := []int{256 << 10, 200 << 10, 200 << 10, 200 << 10}
	done := make(chan error, len(sizes))
	for i, n := range sizes {
		st, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		go func() {
			_, err := st.Write(make([]byte, n))
			if err == nil {
				err = st.CloseWrite()
			}
			done <- err
		}()
		require.Eventually(t, func() bool { return queuedWrites(cli) == i+1 }, 5*time.Second, time.Millisecond)
	}
	got := make(chan int, len(sizes))
	go func() {
		for range sizes {
			st, err := srv.AcceptStream(ctx)
			if err != nil {
				return
			}
			go func() {
				n, err := io.Copy(io.Discard, st)
				assert.NoError(t, err)
				got <- int(n)
			}()
		}
	}()
	cli.release(nil)
	for range sizes {
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-ctx.Done():
			t.Fatalf("Writes stuck; %d still queued", queuedWrites(cli))
		}
	}
	var total int
	for range sizes {
		total += <-got
	}
	assert.Equal(t, 856<<10, total)
}

// TestFairSharesNoStarvation: a bulk stream's frame is served while new
// streams keep coming, each with a frame smaller than the bulk stream's
// share: its tag is fixed when it is first seen and the clock moves on with
// what is served, so the newcomers' tags pass it. Newcomers that fill the
// link (two a batch) leave it a share that shrinks as their backlog grows,
// one per stream, but never none; newcomers that leave half the link to it
// (one a batch) leave it that half.
func TestFairSharesNoStarvation(t *testing.T) {
	const budget = 32 << 10
	for _, tc := range []struct {
		perBatch   int
		mostOthers int // bytes the others may take before the bulk stream is done
	}{
		{2, 1000 * 2 * 16 << 10},
		{1, 2 * 256 << 10},
	} {
		t.Run(fmt.Sprint(tc.perBatch), func(t *testing.T) {
			s := &Session{}
			s.pace.limit.Store(budget)
			bulk := &Stream{id: 1}
			s.queue = append(s.queue, frame{header: header{typ: typeData, id: bulk.id}, data: make([]byte, 256<<10), owner: bulk})
			id, served, others := uint32(3), 0, 0
			for b := 0; b < 1000 && served < 256<<10; b++ {
				for range tc.perBatch { // new streams, 16 KiB each
					st := &Stream{id: id}
					id += 2
					s.queue = append(s.queue, frame{header: header{typ: typeData, id: st.id}, data: make([]byte, 16<<10), owner: st})
				}
				for _, f := range s.takeLocked(nil) {
					if f.id == bulk.id {
						served += f.payloadLen()
					} else {
						others += f.payloadLen()
					}
				}
			}
			t.Logf("the bulk stream's 256 KiB went while the others took %d KiB", others>>10)
			require.Equal(t, 256<<10, served, "the bulk stream starved while others got %d KiB", others>>10)
			assert.LessOrEqual(t, others, tc.mostOthers, "the bulk stream got less than its share")
		})
	}
}

// BenchmarkTakeFair: one batch's choice and taking from a queue with a
// large frame for each of 4,000 busy streams, on a slow link (32 KiB
// budget) where the fair queue sorts them.
func BenchmarkTakeFair(b *testing.B) {
	const streams = 4000
	s := &Session{}
	s.pace.limit.Store(32 << 10)
	data := make([]byte, 64<<10)
	queue := make([]frame, streams)
	for i := range queue {
		queue[i] = frame{header: header{typ: typeData, id: uint32(2*i + 1)}, data: data, owner: &Stream{id: uint32(2*i + 1)}}
	}
	var batch []frame
	for b.Loop() {
		s.queue = append(s.queue[:0], queue...)
		batch = s.takeLocked(batch[:0])
	}
}
