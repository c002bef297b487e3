package mux

import "sync/atomic"

// LimitStats counts what a session turned away or held back to stay
// within its limits, for metrics. The counters only grow, from the
// session's start.
type LimitStats struct {
	// RefusedBacklog counts the streams the peer opened that were reset
	// because AcceptBacklog streams were already waiting for AcceptStream.
	RefusedBacklog uint64
	// RefusedStreams counts the streams the peer opened that were reset
	// because MaxIncomingStreams of its streams were open.
	RefusedStreams uint64
	// RefusedMemory counts the streams reset because data arrived on them
	// while the session held MaxBuffered bytes that nothing had read.
	RefusedMemory uint64
	// RefusalStalls counts the times the session stopped reading from the
	// connection because the resets refusing the peer's streams were
	// written more slowly than the peer opened streams.
	RefusalStalls uint64
	// PongsDropped counts the peer's pings left unanswered because too
	// many answers were waiting to be written already.
	PongsDropped uint64
	// LossWaits counts the times a write waiting on the connection had
	// its deadline moved on because TCP was retransmitting data in flight
	// (see Config.WriteTimeout).
	LossWaits uint64
}

// limitCounters are a session's LimitStats, updated as limits are hit.
type limitCounters struct {
	refusedBacklog, refusedStreams, refusedMemory, refusalStalls, pongsDropped, lossWaits atomic.Uint64
}

// LimitStats returns the session's counters of refused streams and held
// back peers.
func (s *Session) LimitStats() LimitStats {
	c := &s.limits
	return LimitStats{
		RefusedBacklog: c.refusedBacklog.Load(),
		RefusedStreams: c.refusedStreams.Load(),
		RefusedMemory:  c.refusedMemory.Load(),
		RefusalStalls:  c.refusalStalls.Load(),
		PongsDropped:   c.pongsDropped.Load(),
		LossWaits:      c.lossWaits.Load(),
	}
}

// SpliceCounters describe the kernel pipes that splicing uses, shared by
// every session of the process.
type SpliceCounters struct {
	// PipesOpen is the number of pipes open now, idle ones included (two
	// descriptors each).
	PipesOpen int
	// PipeLimit is the most pipes open at once: 1024, or an eighth of the
	// descriptor limit if that is less.
	PipeLimit int
	// PipeShortages counts the times a pipe was wanted when PipeLimit
	// were open or the process was out of descriptors: the data was then
	// copied instead (SpliceFrom returned an error matching ErrNoSplice,
	// or a received frame was read into memory).
	PipeShortages uint64
}

// SpliceStats returns the process's pipe counters.
func SpliceStats() SpliceCounters {
	return SpliceCounters{
		PipesOpen:     int(pipesOpen.Load()),
		PipeLimit:     int(maxPipes()),
		PipeShortages: pipeShortages.Load(),
	}
}

var (
	// pipesOpen counts the pipes open, idle or not.
	pipesOpen atomic.Int32
	// pipeShortages counts the pipes refused (SpliceCounters).
	pipeShortages atomic.Uint64
)
