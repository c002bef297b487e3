package mux

import "sync/atomic"

// memBudget bounds the received data a session holds for its streams
// (Config.MaxBuffered). Each stream's receive window bounds what the peer
// may send on it, but the peer opens the streams, and every new one comes
// with the protocol's initial window: without a bound per session, a peer
// that opens many streams and sends on them while nothing reads them makes
// the session hold their windows' worth each.
//
// buffered counts the bytes received and not yet read: queued on a stream
// (in buffers or pipes), or taken by WriteTo and not yet written. Only the
// reader goroutine adds to it, before queueing a frame's payload, so its
// check that a frame fits (overBudget) holds until the payload is queued:
// everyone else only takes away.
//
// grown counts the receive window granted beyond the initial one, over the
// streams not yet ended. Window growth (creditLocked) stops at a quarter
// of the budget of either: a peer that keeps to its windows then never
// fills the budget unless it has more than about 3/4 MaxBuffered / 256 KiB
// streams that nothing reads (768 with the default), so bulk streams whose
// readers slow down find their windows stop growing, and are not reset.
type memBudget struct {
	max      int64
	buffered atomic.Int64
	grown    atomic.Int64
}

// hold counts n bytes queued for reading.
func (b *memBudget) hold(n int) { b.buffered.Add(int64(n)) }

// release counts n bytes read, written or dropped.
func (b *memBudget) release(n int) { b.buffered.Add(-int64(n)) }

// growth returns how much of want a stream's window may grow by now, and
// counts it in grown: nothing while the session holds more than a quarter
// of its budget, and no more than keeps grown within a quarter of it.
func (b *memBudget) growth(want uint32) uint32 {
	quarter := b.max / 4
	if b.buffered.Load() > quarter {
		return 0
	}
	for {
		g := b.grown.Load()
		n := min(int64(want), quarter-g)
		if n <= 0 {
			return 0
		}
		if b.grown.CompareAndSwap(g, g+n) {
			return uint32(n)
		}
	}
}

// forgetWindowLocked gives back a stream's grown window when the stream ends.
// The window grows no more then: it grows only while the peer may send.
func (st *Stream) forgetWindowLocked() {
	if g := st.recvWin - initialWindow; g > 0 {
		st.sess.mem.grown.Add(-int64(g))
	}
}

// overBudget reports whether data frame h for st would take the session's
// unread data past MaxBuffered, and if so resets st (counted in
// LimitStats.RefusedMemory, logged with the refusals) and drops the
// payload. Other streams carry on: a stream that reads what it gets frees
// its share, and only streams that receive while the budget is full are
// reset. An error is a broken protocol or connection.
func (r *reader) overBudget(st *Stream, h header) (bool, error) {
	s := r.s
	if s.mem.buffered.Load()+int64(h.length) <= s.mem.max {
		return false, nil
	}
	st.mu.Lock()
	if st.state&(stClosed|stReadReset|stFinRecv) != 0 {
		st.mu.Unlock()
		return false, nil // the payload is dropped anyway, not held
	}
	// A peer past its window breaks the protocol, budget or not.
	err := st.chargeWindowLocked(h)
	st.mu.Unlock()
	if err != nil {
		return true, err
	}
	s.limits.refusedMemory.Add(1)
	s.refuse(h.id, refusedMemory)
	st.mu.Lock()
	st.resetLocked(errMemoryReset)
	st.mu.Unlock()
	return true, r.discard(h.length)
}

// refusedMemory says why a stream was reset for the session's budget.
const refusedMemory = "unread received data at the session's limit (MaxBuffered)"
