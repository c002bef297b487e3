package mux

import (
	"errors"
	"fmt"
	"io"
	"syscall"
)

// SpliceConn is a kernel socket at the other end of a splice: SpliceFrom
// reads from it and WriteTo writes to it, moving data between it and the
// session's socket with splice(2), without copying it through the process.
// Spliced is told how many bytes went that way, since they bypass the
// socket's Read and Write (byte counts, idle timers).
type SpliceConn interface {
	syscall.Conn
	Spliced(n int)
}

// ErrNoSplice is matched by the error of SpliceFrom, having moved nothing,
// when the session does not run over a TCP or Unix socket (or has splicing
// turned off), when src is not a kernel socket, on a platform without
// splice(2), and when the process is out of pipes (SpliceCounters): the
// caller then copies, with Write.
var ErrNoSplice = errors.New("mux: cannot splice on this stream")

// spliceMinFrame is the smallest received frame that is spliced: below it
// the extra system calls cost more than the copy they save.
const spliceMinFrame = 16 << 10

// maxStreamPipes bounds the pipes (two descriptors each) queued in a
// stream's receive queue. A pipe's 256 slots each take one received
// fragment, of a page or more, so this holds at least 8 MiB, and usually
// a whole window.
const maxStreamPipes = 8

// SpliceFrom moves data from src to the stream with splice(2) until src
// has nothing to read right now (returning a nil error), src's end
// (io.EOF), or an error: src's, wrapped as "mux: splice from source", or
// the stream's, as Write returns them. Each splice moves at most what the send
// window allows into a kernel pipe, sent as one frame; like Write,
// SpliceFrom waits for the writer to have sent it. It does not wait for
// src to become readable: a caller reads the first bytes of a burst
// itself (with Read or a poller), and splices the rest. The write deadline
// ends the wait for window; bytes already taken from src are sent anyway.
func (st *Stream) SpliceFrom(src SpliceConn) (int64, error) {
	rc := spliceConn(src)
	if st.sess.raw == nil || rc == nil {
		return 0, ErrNoSplice
	}
	st.wmu.Lock()
	defer st.wmu.Unlock()
	p, err := getPipe()
	if err != nil {
		// Out of pipes (the budget, or descriptors): nothing is taken
		// from src yet, and the caller copies instead.
		return 0, fmt.Errorf("%w: %v", ErrNoSplice, err)
	}
	defer func() { p.unref() }() // a pipe left with data (a failed send) is closed
	var total int64
	for {
		st.mu.Lock()
		err := st.awaitWindowLocked()
		k := min(int(st.sendWin), int(st.sess.cfg.MaxFrame))
		st.mu.Unlock()
		if err != nil {
			return total, err
		}
		m, err := fillPipe(rc, p, k)
		if m == 0 {
			if err != nil && err != io.EOF {
				err = fmt.Errorf("mux: splice from source: %w", err)
			}
			return total, err
		}
		// The m bytes are out of src: the write deadline must not drop
		// them (it applies to waiting for window, above).
		st.mu.Lock()
		err = st.sendLocked(frame{header: header{typ: typeData}, pipe: p, pipeN: m, owner: st}, m, true)
		st.mu.Unlock()
		if err != nil {
			return total, err
		}
		total += int64(m)
		src.Spliced(m)
	}
}
