package mux

import (
	"testing"

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
// whole, the least served streams' first, until the budget is spent.
func TestFairSharesFastLink(t *testing.T) {
	s := &Session{}
	streams := []*Stream{{id: 1, served: 1 << 20}, {id: 3}, {id: 5}, {id: 7}}
	for _, st := range streams {
		s.queue = append(s.queue, frame{header: header{typ: typeData, id: st.id}, data: make([]byte, 200<<10), owner: st})
	}
	var ids []uint32
	for _, f := range s.takeLocked(nil) {
		ids = append(ids, f.id)
	}
	// Three frames pass the budget (512 KiB); the stream served the most
	// waits for the next batch, though it wrote first.
	assert.Equal(t, []uint32{3, 5, 7}, ids)
	require.Len(t, s.queue, 1)
	assert.Equal(t, uint32(1), s.queue[0].id)
}
