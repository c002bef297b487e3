package proxy

import (
	"sync"
	"time"
)

// logInterval is how often a repeated per-connection warning is logged.
const logInterval = 10 * time.Second

// rateLog lets a warning that every connection of a burst could raise (a
// peer that refuses streams, a legacy server that is down, the connection
// limit) through once, and then once per logInterval with the number of
// times it was held back meanwhile; the channel's counters count every
// case. The zero value is ready to use.
type rateLog struct {
	mu         sync.Mutex
	next       time.Time // when the next warning may go through
	suppressed int       // held back since the last one
}

// allow reports whether to log now, and how many were held back before.
func (r *rateLog) allow(now time.Time) (ok bool, suppressed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now.Before(r.next) {
		r.suppressed++
		return false, 0
	}
	r.next = now.Add(logInterval)
	suppressed, r.suppressed = r.suppressed, 0
	return true, suppressed
}
