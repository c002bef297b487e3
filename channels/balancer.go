package channels

import "sync/atomic"

// Candidate is one member a RequestChannel may open a stream to.
type Candidate struct {
	Member Member
	// Active is the number of streams currently open from this node to the
	// member on this channel (counted until fully closed or reset).
	Active int
}

// Balancer chooses the member a RequestChannel opens its next stream to.
// Implementations must be safe for concurrent use.
type Balancer interface {
	// Pick returns an index into cands, which is never empty and is sorted
	// by IID so that stateful policies see a stable order. An index out of
	// range is treated as 0.
	Pick(cands []Candidate) int
}

// RoundRobin returns a Balancer that cycles through the candidates.
func RoundRobin() Balancer { return &roundRobin{} }

type roundRobin struct{ next atomic.Uint64 }

func (r *roundRobin) Pick(cands []Candidate) int {
	return int((r.next.Add(1) - 1) % uint64(len(cands)))
}

// LeastStreams returns a Balancer that picks the candidate with the fewest
// active streams, breaking ties round-robin so that idle members share the
// load instead of the first one taking every new stream.
func LeastStreams() Balancer { return &leastStreams{} }

type leastStreams struct{ next atomic.Uint64 }

func (l *leastStreams) Pick(cands []Candidate) int {
	least, ties := cands[0].Active, 0
	for _, c := range cands {
		switch {
		case c.Active < least:
			least, ties = c.Active, 1
		case c.Active == least:
			ties++
		}
	}
	nth := int((l.next.Add(1) - 1) % uint64(ties))
	for i, c := range cands {
		if c.Active == least {
			if nth == 0 {
				return i
			}
			nth--
		}
	}
	return 0 // unreachable: ties >= 1
}
