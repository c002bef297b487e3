package mux

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Stream state bits.
const (
	stOutbound   uint16 = 1 << iota // we opened it
	stFirstSent                     // our first frame (with SYN or ACK) is queued
	stFinSent                       // CloseWrite: we send no more data
	stFinRecv                       // the peer sends no more data
	stReadReset                     // the read side ended abnormally (err)
	stWriteReset                    // the write side ended abnormally (err)
	stClosed                        // Close: incoming data is discarded
	stRemoved                       // out of the session's accounting
	stPending                       // outbound, holds a place in openSlots until the peer accepts it
)

// Stream is one full-duplex byte stream of a Session. It implements
// net.Conn, io.WriterTo, CloseWrite and Reset. Its methods are safe for
// concurrent use; concurrent Writes are serialised, each written whole.
//
// An idle stream holds no buffer and no goroutine: it is this struct, an
// entry in the session's map and, once something waited on it, a channel.
type Stream struct {
	sess  *Session
	id    uint32 // 0 until an outbound stream's first frame
	state uint16

	wmu sync.Mutex // serialises Writes
	mu  sync.Mutex // guards everything below (and state, id)

	err error // why the stream was reset, with stReadReset/stWriteReset

	// Received data: rbufs[rhead:] are segments, oldest first, and roff
	// bytes of rbufs[rhead] are already read if it is a buffer.
	rbufs    []rseg
	rhead    int
	roff     int
	buffered uint32 // bytes in rbufs not yet read
	pipes    int    // pipe segments in rbufs

	// splicing is set while WriteTo writes to a socket it can splice to:
	// the reader goroutine then splices large frames into pipes.
	splicing atomic.Bool
	// dsw is set while WriteTo waits for data with an empty queue: the
	// reader goroutine may then splice received data to dsw's socket
	// itself (deliverLocked), with delivering set, instead of queueing it
	// and waking WriteTo's goroutine for each frame.
	dsw        *segWriter
	delivering bool
	dtotal     int64 // bytes the reader delivered, for WriteTo's count
	derr       error // the reader's failed delivery, for WriteTo to return

	// Receive window: the peer may send recvRemain more bytes; consumed
	// bytes were read (or discarded) since the last window update, which
	// was at session clock epoch. recvWin = buffered + recvRemain + consumed.
	recvWin    uint32
	recvRemain uint32
	consumed   uint32
	epoch      int64

	sendWin uint32 // bytes we may send before the peer's next window update

	// readWake and writeWake wake a waiting Read or Write; made on first
	// use, capacity 1. The writer goroutine reports on writeWake that it
	// set wres, its verdict on the Write's data.
	readWake, writeWake chan struct{}
	wres                atomic.Int32
	dl                  *deadlines // made by the first Set*Deadline

	// wsw is WriteTo's writer while it writes to its destination: the
	// stream's end may cut the write short (cutWriteToLocked).
	wsw *segWriter

	// tail is the buffer of the stream's last frame queued, if that frame
	// is a small Write's copy, queued while the session's queue had
	// generation tailGen: while the queue keeps that generation, the frame
	// is still queued, and small Writes may append to it.
	tail    *[]byte
	tailGen uint64

	rbuf0 [1]rseg // rbufs' first backing array
}

// rseg is a run of received data: a pooled buffer, or n bytes in a pipe
// (spliced from the connection), of which the segment holds a reference.
type rseg struct {
	b *[]byte
	p *kpipe
	n int
}

// release drops the segment's buffer or pipe reference.
func (g rseg) release() {
	if g.b != nil {
		putBuf(g.b)
	} else {
		g.p.unref()
	}
}

// Writer verdicts in Stream.wres.
const (
	writePending int32 = iota
	writeOK
	writeFailed
	writeWithdrawn // a reset or the session's end dropped the rest of a split frame
)

func newStream(s *Session, id uint32, state uint16) *Stream {
	return &Stream{
		sess:       s,
		id:         id,
		state:      state,
		recvWin:    initialWindow,
		recvRemain: initialWindow,
		sendWin:    initialWindow,
		epoch:      s.clock(),
	}
}

var (
	_ net.Conn    = (*Stream)(nil)
	_ io.WriterTo = (*Stream)(nil)
)

// ID returns the stream's ID: 0 for a stream from OpenStream until its
// first frame is queued.
func (st *Stream) ID() uint32 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.id
}

// Read reads data the peer sent. It returns io.EOF once the peer
// half-closed the stream and everything before was read, an error matching
// ErrStreamReset on any other end, and one matching os.ErrDeadlineExceeded
// past the read deadline. A Read into an empty buffer waits until data is
// there (returning 0, nil), so a caller can wait without holding a buffer.
func (st *Stream) Read(b []byte) (int, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for {
		if err := st.readCheckLocked(); err != nil {
			st.passWakeLocked()
			return 0, err
		}
		if st.buffered > 0 {
			if len(b) == 0 {
				return 0, nil
			}
			n, err := st.copyOutLocked(b)
			st.creditLocked(uint32(n))
			if err != nil {
				st.failLocked()
				return n, err
			}
			if st.buffered > 0 {
				st.passWakeLocked()
			}
			return n, nil
		}
		if st.state&stFinRecv != 0 {
			st.passWakeLocked()
			return 0, io.EOF
		}
		st.waitLocked(&st.readWake)
	}
}

// passWakeLocked passes a wake-up on to the next of concurrent Reads: a
// wake-up (data, the end, a deadline's timer) wakes one waiter, which
// hands it on when what woke it holds for the others too.
func (st *Stream) passWakeLocked() { notify(st.readWake) }

// WriteTo writes the stream's data to w until the peer's FIN (returning a
// nil error) or an error. Received buffers go to w as they are, with one
// writev when w is a socket. When w is a SpliceConn and the session runs
// over a TCP or Unix socket, large frames go from the session's socket to w's
// by splice(2), never copied through the process. The read deadline
// applies to waiting for data. If the stream is reset, closed or its
// session ends while WriteTo waits for w to take data, and w has a
// SetWriteDeadline method (a net.Conn), WriteTo sets w's write deadline in
// the past to cut the write short, and returns the stream's error: a
// destination that does not read cannot hold it.
func (st *Stream) WriteTo(w io.Writer) (int64, error) {
	sw := segWriter{w: w}
	sw.dl, _ = w.(writeDeadliner)
	if st.sess.raw != nil {
		if sw.raw = spliceConn(w); sw.raw != nil {
			sw.sc = w.(SpliceConn)
			st.splicing.Store(true)
			defer st.splicing.Store(false)
		}
	}
	var (
		total int64
		held  []rseg
	)
	for {
		st.mu.Lock()
		for {
			for st.delivering {
				// The reader goroutine is writing to w for us: whatever
				// woke us, wait until it is done (it wakes us then), so
				// that its bytes count in this call and w is ours again.
				wake := st.wakeChanLocked(&st.readWake)
				st.mu.Unlock()
				<-wake
				st.mu.Lock()
			}
			total += st.dtotal
			st.dtotal = 0
			if err := st.derr; err != nil {
				st.derr = nil
				st.mu.Unlock()
				return total, err
			}
			if err := st.readCheckLocked(); err != nil {
				st.mu.Unlock()
				return total, err
			}
			if st.buffered > 0 {
				break
			}
			if st.state&stFinRecv != 0 {
				st.mu.Unlock()
				return total, nil
			}
			if sw.raw != nil {
				st.dsw = &sw // the reader may deliver to w while we wait
			}
			st.waitLocked(&st.readWake)
			st.dsw = nil
		}
		// Take every segment: the reader goroutine queues new data in new
		// buffers (or after them in the same pipe) meanwhile.
		held = append(held[:0], st.rbufs[st.rhead:]...)
		roff := st.roff
		n := st.buffered
		st.dropBufsLocked(false)
		st.wsw = &sw // the stream's end may cut the write short
		st.mu.Unlock()

		written, err := sw.write(held, roff)
		total += written
		for _, g := range held {
			g.release()
		}
		clear(held)

		st.mu.Lock()
		st.wsw = nil
		st.sess.mem.release(int(n))
		st.creditLocked(n)
		if err != nil && sw.cut {
			// The write failed because the stream ended: say so.
			if rerr := st.readCheckLocked(); rerr != nil {
				err = rerr
			}
		}
		st.mu.Unlock()
		if err != nil {
			return total, err
		}
	}
}

// writeDeadliner is a destination of WriteTo whose blocked writes can be
// cut short, such as a net.Conn.
type writeDeadliner interface {
	SetWriteDeadline(time.Time) error
}

// aLongTimeAgo is a deadline in the past: it ends a wait at once.
var aLongTimeAgo = time.Unix(1, 0)

// cutWriteToLocked interrupts WriteTo's write to its destination when the
// stream's read side ends abnormally: a destination that does not read
// must not keep WriteTo, and the goroutine that runs it, past the end.
func (st *Stream) cutWriteToLocked() {
	if sw := st.wsw; sw != nil && sw.dl != nil && !sw.cut {
		sw.cut = true
		_ = sw.dl.SetWriteDeadline(aLongTimeAgo)
	}
}

// segWriter writes received segments to w: runs of buffers with one
// writev, pipes by splice(2) when raw is w's socket, else through a buffer.
type segWriter struct {
	w   io.Writer
	raw syscall.RawConn // nil: no splicing
	sc  SpliceConn
	iov net.Buffers
	out net.Buffers // iov as consumed by its WriteTo
	// dl is w if its writes can be cut short; cut says the stream's end
	// did (under the stream's lock).
	dl  writeDeadliner
	cut bool
}

// write writes segs, the first of which has its first roff bytes read.
func (sw *segWriter) write(segs []rseg, roff int) (int64, error) {
	var total int64
	for i, g := range segs {
		if g.b != nil {
			off := 0
			if i == 0 {
				off = roff
			}
			sw.iov = append(sw.iov, (*g.b)[off:])
			continue
		}
		n, err := sw.flush()
		total += n
		if err != nil {
			return total, err
		}
		k, err := sw.pipe(g)
		total += k
		if err != nil {
			return total, err
		}
	}
	n, err := sw.flush()
	return total + n, err
}

func (sw *segWriter) flush() (int64, error) {
	if len(sw.iov) == 0 {
		return 0, nil
	}
	sw.out = sw.iov
	n, err := sw.out.WriteTo(sw.w)
	clear(sw.iov)
	sw.iov = sw.iov[:0]
	return n, err
}

// pipe writes a pipe segment's bytes.
func (sw *segWriter) pipe(g rseg) (int64, error) {
	if sw.raw != nil {
		if err := drainPipe(sw.raw, g.p, g.n, false, nil); err != nil {
			return 0, err
		}
		sw.sc.Spliced(g.n)
		return int64(g.n), nil
	}
	b := getBuf(g.n)
	defer putBuf(b)
	var total int64
	for left := g.n; left > 0; {
		k, err := readPipe(g.p, (*b)[:min(left, cap(*b))])
		if err != nil {
			return total, err
		}
		n, err := sw.w.Write((*b)[:k])
		total += int64(n)
		if err != nil {
			return total, err
		}
		left -= k
	}
	return total, nil
}

// smallWrite is the largest Write that is copied and queued without
// waiting for the writer, when the connection is busy: a request, a reply
// or a stream header. Copying it costs less than a round trip through the
// writer goroutine, and the caller moves on (to read the next message, or
// to write more that the writer then sends in the same writev). The send
// window still bounds what is queued, and small Writes that follow one
// another while the writer is busy share a buffer and a frame
// (queueCopyLocked), so that memory follows the bytes queued, not the
// number of Writes. On an idle connection Write writes it at once itself,
// as any other.
const smallWrite = 4 << 10

// queueCopyLocked queues a copy of b, a small Write, without waiting: in
// the buffer of the stream's previous small Write if that is still queued
// and has room, else in a new buffer and frame. A stream that writes byte
// by byte on a busy session then queues its bytes in few buffers (the
// second one of smallWrite bytes), not one buffer per byte.
func (st *Stream) queueCopyLocked(b []byte) error {
	s := st.sess
	if st.tail != nil {
		s.sendMu.Lock()
		ok := !s.sendClosed && st.tailGen == s.queueGen && len(*st.tail)+len(b) <= cap(*st.tail)
		if ok {
			*st.tail = append(*st.tail, b...)
		}
		s.sendMu.Unlock()
		if ok {
			return nil
		}
	}
	size := len(b)
	if st.tail != nil {
		size = max(size, smallWrite) // a run of small Writes
	}
	c := getBuf(size)
	*c = append((*c)[:0], b...)
	f := frame{header: header{typ: typeData}, copied: c}
	if st.state&stFirstSent == 0 {
		// The stream's first frame (with SYN or ACK) is not appended to.
		if err := st.queueLocked(f); err != nil {
			putBuf(c)
			return err
		}
		return nil
	}
	st.tail = nil
	f.id = st.id
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if err := s.pushLocked(f); err != nil {
		putBuf(c)
		return err
	}
	st.tail, st.tailGen = c, s.queueGen
	return nil
}

// Write writes b, splitting it into frames as the send window allows. On
// a busy connection, a Write of at most smallWrite bytes that fits the
// window is copied and queued, and returns at once; any other Write returns
// once its data is written to the connection, by the session's writer or,
// if the connection is idle, by Write itself: its frames reference b,
// which is never copied. A reset, the session's end or the write deadline
// ends a waiting Write at once, unless its data is being written at that
// moment: then Write returns when that write does (within WriteTimeout,
// or 100ms after the session's end), since b is in use until then.
func (st *Stream) Write(b []byte) (int, error) {
	st.wmu.Lock()
	defer st.wmu.Unlock()
	st.mu.Lock()
	defer st.mu.Unlock()
	n := 0
	for {
		if err := st.writeCheckLocked(); err != nil {
			return n, err
		}
		if len(b) == 0 {
			return n, nil
		}
		if err := st.awaitWindowLocked(); err != nil {
			return n, err
		}
		k := min(len(b), int(st.sendWin))
		if n == 0 && k == len(b) && k <= smallWrite {
			if wrote, err := st.writeOwnLocked(frame{header: header{typ: typeData}, data: b}, k); wrote {
				if err != nil {
					return 0, err
				}
				return k, nil
			}
			if err := st.queueCopyLocked(b); err != nil {
				st.sessionEndedLocked(st.sess.cause())
				return 0, st.err
			}
			st.sendWin -= uint32(k)
			return k, nil
		}
		if err := st.sendLocked(frame{header: header{typ: typeData}, data: b[:k], owner: st}, k, false); err != nil {
			return n, err
		}
		n += k
		b = b[k:]
		if len(b) == 0 {
			// Written, even if the stream was reset meanwhile.
			return n, nil
		}
	}
}

// awaitWindowLocked waits until the send window has room, or returns the
// error that ends a Write now.
func (st *Stream) awaitWindowLocked() error {
	for {
		if err := st.writeCheckLocked(); err != nil {
			return err
		}
		if st.sendWin > 0 {
			return nil
		}
		st.waitLocked(&st.writeWake)
	}
}

// sendLocked sends f, a data frame of k bytes (within the send window)
// that st owns: it writes f itself if the connection is idle, or queues f
// and waits until the writer has written it. Unless keep, the write
// deadline withdraws f while it waits in the queue; a frame that holds
// bytes taken from elsewhere (SpliceFrom's pipe) is kept, and sent.
func (st *Stream) sendLocked(f frame, k int, keep bool) error {
	if wrote, err := st.writeOwnLocked(f, k); wrote {
		return err
	}
	st.wakeChanLocked(&st.writeWake) // made before the writer needs it
	st.wres.Store(writePending)
	if err := st.queueLocked(f); err != nil {
		st.sessionEndedLocked(st.sess.cause())
		return st.err
	}
	st.sendWin -= uint32(k)
	if !st.awaitWriteLocked(k, keep) {
		return st.writeFailedLocked()
	}
	return nil
}

// writeOwnLocked writes f, a data frame of k bytes (within the send
// window), on the calling goroutine if the connection is idle (claimConn):
// handing f to the writer goroutine and waiting for its verdict would only
// add two goroutine switches. wrote says whether it did; if not, f is the
// caller's to queue. The stream's first frame is always queued: it carries
// SYN or ACK, and SYNs must leave in stream ID order (pushFirst).
func (st *Stream) writeOwnLocked(f frame, k int) (wrote bool, err error) {
	if st.state&stFirstSent == 0 || !st.sess.claimConn(k) {
		return false, nil
	}
	f.id, f.owner = st.id, nil
	st.sendWin -= uint32(k)
	st.mu.Unlock()
	err = st.sess.writeDirect(f)
	st.mu.Lock()
	if err != nil {
		st.sessionEndedLocked(st.sess.cause())
		return true, st.writeFailedLocked()
	}
	return true, nil
}

// writeFailedLocked returns the error of a Write whose data the session
// failed to write (or withdrew).
func (st *Stream) writeFailedLocked() error {
	if err := st.writeCheckLocked(); err != nil {
		return err
	}
	return &resetError{session: st.sess.cause()}
}

// awaitWriteLocked waits for the writer's verdict on k bytes just queued,
// and reports whether they were written. Waiting, it gives way to a reset,
// the session's end or (unless keep) the deadline by withdrawing the data
// if the writer has not taken it yet; once taken, the data is the
// writer's until its verdict, however long (bounded by WriteTimeout). The
// rest of data whose head the writer took (a split frame) stays at the
// deadline, since the peer has part of it; a reset or the session's end
// drops it, and the Write ends once the writer is done with the head.
func (st *Stream) awaitWriteLocked(k int, keep bool) bool {
	aborting, final := false, false
	for {
		if r := st.wres.Load(); r != writePending {
			switch r {
			case writeFailed:
				st.sessionEndedLocked(st.sess.cause())
				return false
			case writeWithdrawn:
				return false
			}
			return true
		}
		if !final && st.writeAbortLocked(keep) {
			// final: a reset or the session's end, after which nothing of
			// this Write may wait any more.
			final = st.state&stWriteReset != 0 || st.sess.IsClosed()
			if (!aborting || final) && st.sess.cancelWrite(st, final) {
				st.sendWin += uint32(k)
				return false
			}
			aborting = true // the writer has the data: wait for its verdict
		}
		wake := st.writeWake
		st.mu.Unlock()
		if final {
			<-wake
		} else {
			select {
			case <-wake:
			case <-st.sess.done:
			}
		}
		st.mu.Lock()
	}
}

// writeAbortLocked reports whether a waiting Write must give up: at a
// reset, the session's end or, unless keep, the write deadline.
func (st *Stream) writeAbortLocked(keep bool) bool {
	if st.state&stWriteReset != 0 || st.sess.IsClosed() {
		return true
	}
	return !keep && st.dl != nil && expired(st.dl.write)
}

// CloseWrite half-closes the stream with FIN: the peer reads io.EOF after
// everything written before. Reading goes on. It is idempotent.
func (st *Stream) CloseWrite() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case st.state&stFinSent != 0:
		return nil
	case st.state&stWriteReset != 0:
		return st.err
	}
	if st.sess.IsClosed() || st.queueLocked(frame{header: header{typ: typeWindowUpdate, flags: flagFIN}}) != nil {
		st.sessionEndedLocked(st.sess.cause())
		return st.err
	}
	st.state |= stFinSent
	notify(st.writeWake)
	notify(st.readWake) // an AwaitReset that waits returns
	st.maybeRemoveLocked()
	return nil
}

// Close closes both directions: it sends FIN if not yet sent, and discards
// the data received and still arriving (crediting its window, so that the
// peer's writer is not stalled). Pending and later Reads fail with an error
// matching net.ErrClosed, Writes with ErrWriteAfterClose. Close is
// idempotent and returns nil.
func (st *Stream) Close() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.state&stClosed != 0 {
		return nil
	}
	st.state |= stClosed
	st.cutWriteToLocked()
	if n := st.buffered; n > 0 {
		st.dropBufsLocked(true)
		st.creditLocked(n)
	}
	if st.state&(stFinSent|stWriteReset) == 0 && !st.sess.IsClosed() &&
		st.queueLocked(frame{header: header{typ: typeWindowUpdate, flags: flagFIN}}) == nil {
		st.state |= stFinSent
	}
	st.stopTimersLocked()
	notify(st.readWake)
	notify(st.writeWake)
	st.maybeRemoveLocked()
	return nil
}

// AwaitReset waits until the stream is reset, by the peer or by the
// session's end, and returns the error a Write would then return. It
// returns nil, without waiting, once the stream's write side has ended
// cleanly (CloseWrite) or it was closed here, and when the read deadline
// passes. A caller that has read the peer's FIN and has nothing to write
// for now learns of the peer's reset from it at once, not at its next
// Write. It shares the read side's wake-up: call it once reading is over
// (Read or WriteTo returned EOF), not alongside a Read.
func (st *Stream) AwaitReset() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	for {
		switch {
		case st.state&(stFinSent|stClosed) != 0:
			return nil
		case st.state&stWriteReset != 0 || st.sess.IsClosed():
			return st.writeCheckLocked()
		case st.dl != nil && expired(st.dl.read):
			return nil
		}
		st.waitLocked(&st.readWake)
	}
}

// Reset aborts the stream in both directions: it sends RST if the peer
// knows the stream, and pending and later Reads and Writes on both ends
// fail with an error matching ErrStreamReset. It is idempotent.
func (st *Stream) Reset() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.state&(stReadReset|stWriteReset) == stReadReset|stWriteReset {
		return nil
	}
	peerKnows := st.state&(stOutbound|stFirstSent) != stOutbound
	if peerKnows && st.state&stRemoved == 0 && !st.sess.IsClosed() {
		_ = st.queueLocked(frame{header: header{typ: typeWindowUpdate, flags: flagRST}})
	}
	st.resetLocked(errLocalReset)
	return nil
}

// resetLocked ends both directions with err.
func (st *Stream) resetLocked(err error) {
	st.state |= stReadReset | stWriteReset
	if st.err == nil {
		st.err = err
	}
	st.cutWriteToLocked()
	st.dropBufsLocked(true)
	st.stopTimersLocked()
	notify(st.readWake)
	notify(st.writeWake)
	st.maybeRemoveLocked()
}

// sessionEndedLocked resets the directions still open when the session
// ends. A read side that got the peer's FIN keeps its data and its clean
// end: everything the peer sent has arrived.
func (st *Stream) sessionEndedLocked(cause error) {
	var ended bool
	if st.state&(stFinRecv|stReadReset) == 0 {
		st.state |= stReadReset
		st.cutWriteToLocked()
		st.dropBufsLocked(true)
		ended = true
	}
	if st.state&(stFinSent|stWriteReset) == 0 {
		st.state |= stWriteReset
		ended = true
	}
	if ended && st.err == nil {
		st.err = &resetError{session: cause}
	}
	st.state |= stRemoved
	notify(st.readWake)
	notify(st.writeWake)
}

// maybeRemoveLocked drops the stream from the session's accounting once
// both directions have ended.
func (st *Stream) maybeRemoveLocked() {
	if st.state&stRemoved != 0 ||
		st.state&(stFinSent|stWriteReset) == 0 ||
		st.state&(stFinRecv|stReadReset) == 0 {
		return
	}
	st.state |= stRemoved
	st.forgetWindowLocked()
	st.sess.forget(st)
}

// readCheckLocked returns the error that ends a Read now, if any.
func (st *Stream) readCheckLocked() error {
	switch {
	case st.state&stClosed != 0:
		return errReadAfterClose
	case st.state&stReadReset != 0:
		return st.err
	}
	if st.state&stFinRecv == 0 && st.sess.IsClosed() {
		// Not every stream is in the session's map (one not yet sent is
		// not): each notices the end itself.
		st.sessionEndedLocked(st.sess.cause())
		return st.err
	}
	if st.dl != nil && expired(st.dl.read) {
		return timeoutError("read")
	}
	return nil
}

// writeCheckLocked returns the error that ends a Write now, if any.
func (st *Stream) writeCheckLocked() error {
	switch {
	case st.state&stWriteReset != 0:
		return st.err
	case st.state&(stFinSent|stClosed) != 0:
		return ErrWriteAfterClose
	}
	if st.sess.IsClosed() {
		st.sessionEndedLocked(st.sess.cause())
		return st.err
	}
	if st.dl != nil && expired(st.dl.write) {
		return timeoutError("write")
	}
	return nil
}

// waitLocked waits, with st.mu released, for a notification on *ch or the
// session's end.
func (st *Stream) waitLocked(ch *chan struct{}) {
	wake := st.wakeChanLocked(ch)
	st.mu.Unlock()
	select {
	case <-wake:
	case <-st.sess.done:
	}
	st.mu.Lock()
}

func (st *Stream) wakeChanLocked(ch *chan struct{}) chan struct{} {
	if *ch == nil {
		*ch = make(chan struct{}, 1)
	}
	return *ch
}

// notify wakes the waiter on ch, if any; a wake-up without waiter is kept
// for the next wait, which then re-checks its condition.
func notify(ch chan struct{}) {
	if ch == nil {
		return
	}
	select {
	case ch <- struct{}{}:
	default:
	}
}

// ackLocked sends an inbound stream's first frame, with ACK and nothing
// else, unless the stream has sent or lost it: the peer learns that the
// stream left the accept backlog, and may open another.
func (st *Stream) ackLocked() {
	if st.state&(stFirstSent|stWriteReset|stRemoved) != 0 || st.sess.IsClosed() {
		return
	}
	_ = st.queueLocked(frame{header: header{typ: typeWindowUpdate}})
}

// acceptedLocked gives up an outbound stream's place among those the peer
// has not accepted yet (Session.openSlots): the peer sent its first frame,
// or the stream ended.
func (st *Stream) acceptedLocked() {
	if st.state&stPending != 0 {
		st.state &^= stPending
		<-st.sess.openSlots
	}
}

// queueLocked queues f for the stream, adding SYN (outbound) or ACK
// (inbound) if it is the stream's first frame.
func (st *Stream) queueLocked(f frame) error {
	st.tail = nil // what follows f must not go into a frame before it
	if st.state&stFirstSent == 0 {
		st.state |= stFirstSent
		if st.state&stOutbound != 0 {
			f.flags |= flagSYN
			return st.sess.pushFirst(st, f)
		}
		f.flags |= flagACK
	}
	f.id = st.id
	return st.sess.push(f)
}

// copyOutLocked copies buffered data into b, releasing drained segments.
// It fails only if a pipe holds less than it should.
func (st *Stream) copyOutLocked(b []byte) (int, error) {
	n := 0
	var err error
	for n < len(b) && st.rhead < len(st.rbufs) {
		g := &st.rbufs[st.rhead]
		if g.b != nil {
			k := copy(b[n:], (*g.b)[st.roff:])
			n += k
			st.roff += k
			if st.roff < len(*g.b) {
				continue
			}
		} else {
			var k int
			k, err = readPipe(g.p, b[n:n+min(len(b)-n, g.n)])
			if err != nil {
				break
			}
			n += k
			if g.n -= k; g.n > 0 {
				continue
			}
			st.pipes--
		}
		g.release()
		*g = rseg{}
		st.rhead++
		st.roff = 0
	}
	st.buffered -= uint32(n)
	st.sess.mem.release(n)
	if st.rhead == len(st.rbufs) {
		st.resetBufsLocked()
	}
	return n, err
}

// failLocked resets the stream after a local failure, telling the peer.
func (st *Stream) failLocked() {
	if st.state&stRemoved == 0 && !st.sess.IsClosed() {
		_ = st.queueLocked(frame{header: header{typ: typeWindowUpdate, flags: flagRST}})
	}
	st.resetLocked(errLocalReset)
}

// appendLocked queues p (copied) as received data, filling the newest
// buffer before taking new ones, so that many small frames share buffers.
// New buffers are sized for the backlog as well as p: a stream whose
// reader lags moves up to large buffers.
func (st *Stream) appendLocked(p []byte) {
	backlog := int(st.buffered)
	st.buffered += uint32(len(p))
	st.sess.mem.hold(len(p))
	if st.rhead < len(st.rbufs) {
		if tail := st.rbufs[len(st.rbufs)-1].b; tail != nil {
			k := copy((*tail)[len(*tail):cap(*tail)], p)
			*tail = (*tail)[:len(*tail)+k]
			p = p[k:]
		}
	}
	for len(p) > 0 {
		b := getBuf(max(len(p), backlog))
		k := copy((*b)[:cap(*b)], p)
		*b = (*b)[:k]
		p = p[k:]
		st.pushLocked(rseg{b: b})
	}
}

func (st *Stream) pushLocked(g rseg) {
	if st.rbufs == nil {
		st.rbufs = st.rbuf0[:0]
	}
	st.rbufs = append(st.rbufs, g)
}

// appendBufsLocked queues filled buffers as received data.
func (st *Stream) appendBufsLocked(bufs []*[]byte) {
	for _, b := range bufs {
		st.buffered += uint32(len(*b))
		st.sess.mem.hold(len(*b))
		st.pushLocked(rseg{b: b})
	}
}

// tailPipeLocked returns, with a reference, the pipe of the newest
// segment, so that data spliced next follows it there; nil if the newest
// segment is a buffer.
func (st *Stream) tailPipeLocked() *kpipe {
	if st.rhead == len(st.rbufs) {
		return nil
	}
	p := st.rbufs[len(st.rbufs)-1].p
	if p != nil {
		p.ref()
	}
	return p
}

// appendPipeLocked queues n bytes just spliced into p.
func (st *Stream) appendPipeLocked(p *kpipe, n int) {
	st.buffered += uint32(n)
	st.sess.mem.hold(n)
	if st.rhead < len(st.rbufs) {
		if tail := &st.rbufs[len(st.rbufs)-1]; tail.p == p {
			tail.n += n
			return
		}
	}
	p.ref()
	st.pipes++
	st.pushLocked(rseg{p: p, n: n})
}

// dropBufsLocked empties the receive queue, returning the buffers to their
// pool if release (else the caller has taken them, and releases their bytes
// from the session's budget when done).
func (st *Stream) dropBufsLocked(release bool) {
	if release {
		st.sess.mem.release(int(st.buffered))
	}
	for i := st.rhead; i < len(st.rbufs); i++ {
		if release {
			st.rbufs[i].release()
		}
		st.rbufs[i] = rseg{}
	}
	st.buffered, st.pipes = 0, 0
	st.resetBufsLocked()
}

func (st *Stream) resetBufsLocked() {
	st.rhead, st.roff = 0, 0
	if cap(st.rbufs) > 16 {
		st.rbufs = nil // a burst is over: an idle stream keeps little
	} else {
		st.rbufs = st.rbufs[:0]
	}
}

// creditLocked accounts for n bytes read or discarded, and sends a window
// update once half the window is consumed: small exchanges send none. The
// window doubles, up to MaxStreamWindow, when that half was consumed within
// growRTTs round trips of the previous update: the reader keeps up and the
// window, not the reader, limits the stream; and the session's budget
// allows it (memBudget.growth).
func (st *Stream) creditLocked(n uint32) {
	st.consumed += n
	if st.state&(stFinRecv|stReadReset) != 0 || st.consumed < st.recvWin/2 {
		return // the peer sends nothing more, or there is no hurry
	}
	s := st.sess
	delta := st.consumed
	now := s.clock()
	if rtt := s.rtt.Load(); st.state&stClosed == 0 && rtt > 0 && now-st.epoch < growRTTs*rtt && st.recvWin < s.cfg.MaxStreamWindow {
		grow := s.mem.growth(min(st.recvWin, s.cfg.MaxStreamWindow-st.recvWin))
		st.recvWin += grow
		delta += grow
	}
	st.epoch = now
	st.consumed = 0
	st.recvRemain += delta
	_ = st.queueLocked(frame{header: header{typ: typeWindowUpdate, length: delta}})
}

// growRTTs is the auto-tuning threshold: half a window consumed in less
// than this many round trips (a whole one in twice as many) doubles it.
const growRTTs = 2

// LocalAddr returns the session connection's local address.
func (st *Stream) LocalAddr() net.Addr { return st.sess.conn.LocalAddr() }

// RemoteAddr returns the session connection's remote address.
func (st *Stream) RemoteAddr() net.Addr { return st.sess.conn.RemoteAddr() }

// SetDeadline sets both the read and the write deadline.
func (st *Stream) SetDeadline(t time.Time) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.setDeadlineLocked(t, true, true)
	return nil
}

// SetReadDeadline sets the deadline of Read and WriteTo; zero means none.
// It can be moved, also after it passed.
func (st *Stream) SetReadDeadline(t time.Time) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.setDeadlineLocked(t, true, false)
	return nil
}

// SetWriteDeadline sets the deadline of Write; zero means none.
func (st *Stream) SetWriteDeadline(t time.Time) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.setDeadlineLocked(t, false, true)
	return nil
}
