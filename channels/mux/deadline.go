package mux

import "time"

// deadlines are a stream's read and write deadlines. A timer does not end
// a wait itself: it wakes the waiter, which compares the clock with the
// deadline, so moving a deadline (even one that passed) just works.
type deadlines struct {
	read, write    time.Time
	rtimer, wtimer *time.Timer
}

// expired reports whether deadline t is set and passed.
func expired(t time.Time) bool { return !t.IsZero() && !time.Now().Before(t) }

func (st *Stream) setDeadlineLocked(t time.Time, read, write bool) {
	if st.dl == nil {
		if t.IsZero() {
			return
		}
		st.dl = new(deadlines)
	}
	if read {
		st.dl.read = t
		st.dl.rtimer = armTimer(st.dl.rtimer, t, st.wakeRead)
		notify(st.readWake)
	}
	if write {
		st.dl.write = t
		st.dl.wtimer = armTimer(st.dl.wtimer, t, st.wakeWrite)
		notify(st.writeWake)
	}
}

// armTimer makes tm call f at t, creating it if needed; zero t stops it.
func armTimer(tm *time.Timer, t time.Time, f func()) *time.Timer {
	if t.IsZero() {
		if tm != nil {
			tm.Stop()
		}
		return tm
	}
	d := time.Until(t)
	if tm == nil {
		return time.AfterFunc(d, f)
	}
	tm.Reset(d)
	return tm
}

func (st *Stream) wakeRead() {
	st.mu.Lock()
	notify(st.readWake)
	st.mu.Unlock()
}

func (st *Stream) wakeWrite() {
	st.mu.Lock()
	notify(st.writeWake)
	st.mu.Unlock()
}

// stopTimersLocked stops the deadline timers of a stream that is over.
func (st *Stream) stopTimersLocked() {
	if st.dl == nil {
		return
	}
	if st.dl.rtimer != nil {
		st.dl.rtimer.Stop()
	}
	if st.dl.wtimer != nil {
		st.dl.wtimer.Stop()
	}
}
