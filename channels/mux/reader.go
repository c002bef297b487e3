package mux

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sync/atomic"
	"time"
)

// readBufSize is the reader's buffer: headers and small payloads are read
// many at a time; larger payloads go straight into pooled buffers.
const readBufSize = 64 << 10

// reader is the session's receive side, run by one goroutine. It never
// writes to the connection: replies (pongs, window updates, resets) are
// queued for the writer, so two peers whose connections are full in both
// directions cannot deadlock.
type reader struct {
	s   *Session
	lim *headerReader
	// spliced says the last data frame was spliced: until the next data
	// frame, headers are read one at a time, since that frame's payload
	// is likely spliced as well.
	spliced bool
	br      *bufio.Reader
	bufs    []*[]byte // scratch for a large payload's buffers
}

// headerReader is the read buffer's source, the connection. After a
// spliced payload it reads one header's worth only: reading ahead would
// copy into the buffer what the next frame may splice.
type headerReader struct {
	conn  io.Reader
	brief bool           // the next Read reads at most a header
	in    *atomic.Uint64 // counts the bytes read
}

func (h *headerReader) Read(p []byte) (int, error) {
	if h.brief && len(p) > headerSize {
		p = p[:headerSize]
	}
	h.brief = false
	n, err := h.conn.Read(p)
	h.in.Add(uint64(n))
	return n, err
}

// readLoop runs the reader until the connection fails or the peer breaks
// the protocol, and then ends the session.
func (s *Session) readLoop() {
	defer s.wg.Done()
	defer close(s.readerDone)
	r := &reader{s: s, lim: &headerReader{conn: s.conn, in: &s.bytesIn}}
	r.br = bufio.NewReaderSize(r.lim, readBufSize)
	err := r.run()
	s.refusalLog.flush(s)
	s.mu.Lock()
	if s.writeErr != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = s.writeErr // why writeFailed cut the reader short
	}
	s.mu.Unlock()
	if errors.Is(err, ErrProtocol) {
		s.log.Warn("mux: session ends", "remote", s.conn.RemoteAddr().String(), "err", err)
		s.shutdown(err, true, goAwayProtocol)
		return
	}
	s.shutdown(err, false, 0)
}

// refuseLogInterval is the least time between two log lines about one
// session's refused streams.
const refuseLogInterval = 10 * time.Second

// refusalLog rate-limits the log lines about refused streams: a peer that
// opens streams past the limits must not flood the log (the counters in
// LimitStats count every one). Only the reader uses it.
type refusalLog struct {
	last    time.Time // of the last line
	count   int       // refusals not yet logged
	lastID  uint32
	lastWhy string
}

// note records a refusal, and logs the refusals so far unless a line was
// logged less than refuseLogInterval ago.
func (l *refusalLog) note(s *Session, id uint32, why string) {
	l.count++
	l.lastID, l.lastWhy = id, why
	if now := time.Now(); l.last.IsZero() || now.Sub(l.last) >= refuseLogInterval {
		l.last = now
		l.flush(s)
	}
}

// flush logs the refusals not yet logged, if any.
func (l *refusalLog) flush(s *Session) {
	if l.count == 0 {
		return
	}
	s.log.Warn("mux: refusing streams", "remote", s.conn.RemoteAddr().String(), "refused", l.count,
		"last_stream", l.lastID, "reason", l.lastWhy)
	l.count = 0
}

func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

func (r *reader) run() error {
	var hb [headerSize]byte
	for {
		if _, err := io.ReadFull(r.br, hb[:]); err != nil {
			return fmt.Errorf("mux: read: %w", err)
		}
		h := decodeHeader(hb[:])
		r.s.framesIn.Add(1)
		r.s.counters.frameIn(h)
		if h.version != protoVersion {
			return protocolError("unsupported version in frame (%v)", h)
		}
		var err error
		switch h.typ {
		case typeData, typeWindowUpdate:
			err = r.streamFrame(h)
		case typePing:
			switch {
			case h.flags&flagSYN != 0:
				r.s.pushPong(h.length)
			case h.flags&flagACK != 0:
				r.s.pong(h.length)
			}
		case typeGoAway:
			return fmt.Errorf("%w (code %d)", ErrRemoteGoAway, h.length)
		default:
			return protocolError("unknown frame type (%v)", h)
		}
		if err != nil {
			return err
		}
		if r.spliced && h.typ != typeData {
			r.lim.brief = true
		}
	}
}

// streamFrame handles a data or window update frame.
func (r *reader) streamFrame(h header) error {
	data := h.typ == typeData
	if data && h.length > r.s.cfg.MaxStreamWindow {
		return protocolError("data frame larger than any window (%v)", h)
	}
	st, refused, err := r.stream(h)
	if err != nil {
		return err
	}
	if refused != "" {
		r.s.refuse(h.id, refused)
	}
	if st == nil || h.flags&flagRST != 0 {
		// An unknown stream is usually one we reset: its data is dropped.
		if data {
			if err := r.discard(h.length); err != nil {
				return err
			}
		}
		if st != nil {
			st.mu.Lock()
			st.resetLocked(errRemoteReset)
			st.mu.Unlock()
		}
		return nil
	}
	if data && h.length > 0 {
		if over, err := r.overBudget(st, h); over || err != nil {
			return err // budget.go
		}
		if err := r.data(st, h); err != nil {
			return err
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.acceptedLocked() // the peer's first frame on it carries ACK
	if !data && st.state&(stFinSent|stWriteReset) == 0 {
		if uint64(st.sendWin)+uint64(h.length) > math.MaxUint32 {
			return protocolError("window update overflows the send window of %d (%v)", st.sendWin, h)
		}
		st.sendWin += h.length
		notify(st.writeWake)
	}
	if h.flags&flagFIN != 0 && st.state&(stFinRecv|stReadReset) == 0 {
		st.state |= stFinRecv
		notify(st.readWake)
		st.maybeRemoveLocked()
	}
	return nil
}

// stream returns the frame's stream, creating it on SYN, or nil if there
// is none (unknown, or refused: refused then says why).
func (r *reader) stream(h header) (st *Stream, refused string, err error) {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if h.flags&flagSYN == 0 {
		return s.streams[h.id], "", nil
	}
	if h.id == 0 || (h.id%2 == 1) == s.client {
		return nil, "", protocolError("SYN on stream ID %d, which is not the peer's to open (%v)", h.id, h)
	}
	if h.id <= s.lastInbound {
		return nil, "", protocolError("SYN on stream ID %d, not above the last opened %d (%v)", h.id, s.lastInbound, h)
	}
	s.lastInbound = h.id
	if s.err != nil || h.flags&flagRST != 0 {
		return nil, "", nil
	}
	if s.inbound >= s.cfg.MaxIncomingStreams {
		s.limits.refusedStreams.Add(1)
		return nil, refusedTooMany, nil
	}
	st = newStream(s, h.id, 0)
	s.streams[h.id] = st
	select {
	case s.acceptCh <- st:
	default:
		delete(s.streams, h.id)
		s.limits.refusedBacklog.Add(1)
		return nil, refusedBacklog, nil
	}
	s.inbound++
	return st, "", nil
}

// Why an inbound stream was refused.
const (
	refusedTooMany = "too many open inbound streams (MaxIncomingStreams)"
	refusedBacklog = "accept backlog full (AcceptBacklog)"
)

// refuse resets an inbound stream we do not take. Refusals wait for the
// writer like any control frame, but a peer that opens streams faster
// than it reads the resets cannot make them pile up: past
// maxQueuedRefusals queued, the reader waits for the writer to take them,
// and so stops reading from the connection (a peer that stops reading
// altogether is ended by WriteTimeout). The log gets one line per
// refuseLogInterval, with a count.
func (s *Session) refuse(id uint32, why string) {
	s.refusalLog.note(s, id, why)
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.refusals >= maxQueuedRefusals && !s.sendClosed {
		s.limits.refusalStalls.Add(1)
		for s.refusals >= maxQueuedRefusals && !s.sendClosed {
			s.sendMu.Unlock()
			select {
			case <-s.refusalsTaken:
			case <-s.done:
			}
			s.sendMu.Lock()
		}
	}
	if s.pushLocked(frame{header: header{typ: typeWindowUpdate, flags: flagRST, id: id}}) == nil {
		s.refusals++
	}
}

// data reads a data frame's payload into st's receive queue, within st's
// receive window: a peer exceeding it breaks the protocol, so a stream
// never buffers more than its window.
func (r *reader) data(st *Stream, h header) error {
	n := h.length
	if r.s.raw != nil && n >= spliceMinFrame && st.splicing.Load() {
		return r.spliceData(st, h)
	}
	r.spliced = false
	// A small payload is already (or soon) in the read buffer: peek at it
	// and copy it under the stream's lock into the stream's last buffer.
	var p []byte
	small := int(n) <= r.br.Size()
	if small {
		var err error
		if p, err = r.br.Peek(int(n)); err != nil {
			return fmt.Errorf("mux: read: %w", err)
		}
	}
	st.mu.Lock()
	if err := st.chargeWindowLocked(h); err != nil {
		st.mu.Unlock()
		return err
	}
	switch {
	case !st.takesDataLocked(n):
		st.mu.Unlock()
		return r.discard(n)
	case small:
		// The reader writes the payload on itself only when no other
		// frame waits in the read buffer: on a busy session the streams'
		// goroutines write in parallel, and the reader goes on reading.
		// What deliverLocked leaves is queued if st still takes data (it
		// let go of st.mu meanwhile).
		m := len(p)
		if r.br.Buffered() == m {
			m = st.deliverLocked(nil, p, m)
		}
		if m > 0 && st.takesDataLocked(uint32(m)) {
			st.appendLocked(p[len(p)-m:])
			notify(st.readWake)
		}
		st.mu.Unlock()
		_, _ = r.br.Discard(int(n)) // cannot fail: peeked
		return nil
	}
	st.mu.Unlock()
	return r.readBufs(st, n)
}

// readBufs reads n payload bytes into pooled buffers outside st's lock, and
// queues them (or drops them if st stopped taking data meanwhile).
func (r *reader) readBufs(st *Stream, n uint32) error {
	r.bufs = r.bufs[:0]
	for left := int(n); left > 0; {
		b := getBuf(left)
		*b = (*b)[:min(left, cap(*b))]
		r.bufs = append(r.bufs, b)
		if _, err := io.ReadFull(r.br, *b); err != nil {
			r.release()
			return fmt.Errorf("mux: read: %w", noEOF(err))
		}
		left -= len(*b)
	}
	st.mu.Lock()
	if st.takesDataLocked(n) {
		st.appendBufsLocked(r.bufs)
		notify(st.readWake)
		clear(r.bufs)
	} else {
		r.release()
	}
	st.mu.Unlock()
	return nil
}

// chargeWindowLocked takes data frame h's payload out of st's receive
// window: a peer exceeding it breaks the protocol.
func (st *Stream) chargeWindowLocked(h header) error {
	if h.length > st.recvRemain {
		return protocolError("stream %d sent %d bytes with %d left in its window", h.id, h.length, st.recvRemain)
	}
	st.recvRemain -= h.length
	return nil
}

// takesDataLocked reports whether n received bytes are queued for reading;
// if not, they are dropped, and credited back to the peer after a Close (a
// reset stream needs no credit: the peer stops, and the peer's FIN ended
// its data).
func (st *Stream) takesDataLocked(n uint32) bool {
	if st.state&(stClosed|stReadReset|stFinRecv) == 0 {
		return true
	}
	if st.state&(stReadReset|stFinRecv) == 0 {
		st.creditLocked(n) // Close: the dropped bytes count as consumed
	}
	return false
}

func (r *reader) release() {
	for i, b := range r.bufs {
		putBuf(b)
		r.bufs[i] = nil
	}
}

// discard skips n payload bytes.
func (r *reader) discard(n uint32) error {
	if _, err := r.br.Discard(int(n)); err != nil {
		return fmt.Errorf("mux: read: %w", noEOF(err))
	}
	return nil
}

// noEOF turns the end of the connection inside a frame into
// io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// deliverLocked splices the m bytes just received into p (or, with p nil,
// writes b, a small frame's m bytes) on to the socket that WriteTo writes
// to, if WriteTo waits with nothing queued, as far as the socket takes
// them without waiting, and returns how many are left for the queue (the
// last of b's bytes). The reader goroutine then moves a frame from socket
// to socket as a plain relay would, sparing WriteTo's goroutine a wake-up
// per frame (a message's latency); a socket that is full, or slow, is
// WriteTo's to wait for, never the session's.
func (st *Stream) deliverLocked(p *kpipe, b []byte, m int) int {
	sw := st.dsw
	if sw == nil || m == 0 || st.rhead < len(st.rbufs) || st.derr != nil {
		return m
	}
	st.delivering = true
	st.mu.Unlock()
	if h := testHookDeliver.Load(); h != nil {
		(*h)()
	}
	var (
		k   int
		err error
	)
	if p != nil {
		k, err = pushPipe(sw.raw, p, m)
	} else {
		k, err = writeNow(sw.raw, b)
	}
	if k > 0 {
		sw.sc.Spliced(k)
		st.sess.deliveries.Add(1)
	}
	st.mu.Lock()
	st.delivering = false
	st.dtotal += int64(k)
	if err != nil {
		st.derr = err
	}
	if err != nil || st.dsw == nil {
		notify(st.readWake) // WriteTo woke meanwhile, and waits for us
	}
	st.creditLocked(uint32(k))
	return m - k
}

// nextPipe returns a new pipe for st's data, or nil if st holds
// maxStreamPipes pipes already or none is available.
func (r *reader) nextPipe(st *Stream) *kpipe {
	st.mu.Lock()
	more := st.pipes < maxStreamPipes
	st.mu.Unlock()
	if !more {
		return nil
	}
	p, _ := getPipe() // on failure (out of descriptors), copy
	return p
}

// testHookDeliver, if set, runs in deliverLocked without the stream's lock,
// before the splice: tests hold a delivery there.
var testHookDeliver atomic.Pointer[func()]

// spliceData moves a large data frame's payload into a pipe of st's
// receive queue with splice(2): WriteTo splices it on to its socket. What
// the read buffer already holds of it is queued as it is; the payload is
// read the usual way if a pipe fills up, so a slow stream never holds up
// the session, and once the stream holds maxStreamPipes pipes.
func (r *reader) spliceData(st *Stream, h header) error {
	left := int(h.length)
	st.mu.Lock()
	if err := st.chargeWindowLocked(h); err != nil {
		st.mu.Unlock()
		return err
	}
	if k := min(r.br.Buffered(), left); k > 0 {
		p, _ := r.br.Peek(k) // cannot fail: buffered
		if st.takesDataLocked(uint32(k)) {
			st.appendLocked(p)
			notify(st.readWake)
		}
		_, _ = r.br.Discard(k)
		left -= k
	}
	if left == 0 {
		st.mu.Unlock()
		return nil
	}
	// The read buffer is empty now: the socket's next bytes are the rest.
	p := st.tailPipeLocked()
	st.mu.Unlock()
	if p == nil {
		p = r.nextPipe(st)
	}
	if p == nil {
		return r.readBufs(st, uint32(left))
	}
	defer func() { p.unref() }()
	for left > 0 {
		m, full, err := recvPipe(r.s.raw, p, left)
		if err != nil {
			return fmt.Errorf("mux: read: %w", err)
		}
		if full {
			// No free slot in p: its data waits for WriteTo, or came in
			// small fragments (a network's 1500-byte packets fill a
			// pipe's 256 slots with about 370 KB). Go on in another pipe
			// while the stream may have one more, then copy.
			if q := r.nextPipe(st); q != nil {
				p.unref()
				p = q
				continue
			}
			return r.readBufs(st, uint32(left))
		}
		left -= m
		r.s.bytesIn.Add(uint64(m))
		st.mu.Lock()
		// If st stopped taking data, the bytes stay in the pipe, which
		// is then closed rather than reused.
		if st.takesDataLocked(uint32(m)) {
			// What deliverLocked leaves is queued if st still takes data
			// (it let go of st.mu meanwhile).
			if m = st.deliverLocked(p, nil, m); m > 0 && st.takesDataLocked(uint32(m)) {
				st.appendPipeLocked(p, m)
				notify(st.readWake)
			}
		}
		st.mu.Unlock()
	}
	r.spliced, r.lim.brief = true, true
	return nil
}
