package mux

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The send side. Frames go through one queue that a single writer
// goroutine drains: each wake-up takes what is queued (takeLocked: every
// small frame, and large ones up to batchBudget) and writes it with one
// writev, so frames of concurrent streams and control frames share system
// calls. A Write queues its data by reference and waits for the
// writer's verdict; control frames are queued by value and not waited for,
// so the reader goroutine can queue window updates and pongs without ever
// blocking on a full connection.
//
// One exception: a Write (or SpliceFrom) whose frame finds the connection
// idle, nothing queued and no write in progress, writes that frame itself
// (claimConn, writeDirect) while frames queued meanwhile wait for it. A lone
// bulk stream then moves each frame with no goroutine hand-off, as a plain
// relay would; with several busy streams the queue is rarely empty, and
// frames share system calls as before.

// goAwayWait bounds the last write of a closing session (the GoAway), and
// cuts short a write in progress when the session is closed.
const goAwayWait = 100 * time.Millisecond

// maxQueuedPongs bounds the pongs waiting for the writer, so that a peer
// flooding pings while not reading cannot grow the queue without bound.
const maxQueuedPongs = 64

// maxQueuedRefusals bounds the resets refusing inbound streams that wait
// for the writer; past it the reader waits (Session.refuse).
const maxQueuedRefusals = 1024

// errSendClosed refuses frames once the session ended; stream operations
// report the session's cause instead.
var errSendClosed = errors.New("mux: session closed")

// frame is a queued frame. Control frames carry their meaning in the
// header; a data frame's payload is data, which the writer splits into
// frames of at most MaxFrame bytes (the flags go on the first).
type frame struct {
	header
	data []byte
	// owner is the Stream whose Write queued data (by reference, not
	// copied): the writer reports its verdict to it (finishWrite) once the
	// data is written, and only then may the Write return.
	owner *Stream
	// copied, when set, holds the payload instead of data: the pooled
	// buffer that small Writes, which did not wait, were copied into (see
	// Stream.queueCopyLocked; it may grow while queued). The writer
	// returns it to the pool once written.
	copied *[]byte
	// pipe, when set, holds the payload instead of data: pipeN bytes that
	// the writer splices to the connection (at most MaxFrame, one frame).
	// The owner keeps the pipe; the writer only drains it.
	pipe  *kpipe
	pipeN int
	// started says that the writer took the head of this data frame
	// already (takeLocked split it): what is left cannot be withdrawn,
	// since the peer has part of the Write, and the writer may still be
	// writing the head from the owner's buffer or pipe. A reset or the
	// session's end drops it instead: the writer skips it and then tells
	// the owner (writeWithdrawn), once done with the head.
	started, dropped bool
	// fair is where this large frame's share starts in the fair queue,
	// plus one; 0 until chooseLocked first sees it. It stays while the
	// frame waits: the clock, and newer frames' shares, move past it.
	fair uint64
}

// drop empties the rest of a split frame (started) for the writer to skip.
func (f *frame) drop() {
	f.dropped = true
	f.data, f.pipe, f.pipeN = nil, nil, 0
}

// verdict tells f's owner, if any, how the writer's write of f went.
func (f *frame) verdict(ok bool) {
	switch o := f.owner; {
	case o == nil:
	case f.dropped:
		o.wres.Store(writeWithdrawn)
		notify(o.writeWake)
	default:
		o.finishWrite(ok)
	}
}

// payload returns the bytes of a data frame whose payload is not in a
// pipe.
func (f *frame) payload() []byte {
	if f.copied != nil {
		return *f.copied
	}
	return f.data
}

// push queues f for the writer.
func (s *Session) push(f frame) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.pushLocked(f)
}

func (s *Session) pushLocked(f frame) error {
	if s.sendClosed {
		return errSendClosed
	}
	if len(s.queue) == 0 {
		notify(s.sendSignal)
	}
	s.queue = append(s.queue, f)
	return nil
}

// pushPong queues the reply to the peer's ping id, unless too many replies
// are waiting already.
func (s *Session) pushPong(id uint32) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.pongs >= maxQueuedPongs {
		s.limits.pongsDropped.Add(1)
		return
	}
	if s.pushLocked(frame{header: header{typ: typePing, flags: flagACK, length: id}}) == nil {
		s.pongs++
	}
}

// pushFirst queues the first frame of an outbound stream, which carries
// SYN: it assigns the stream its ID and registers it in the same critical
// section as the queueing, so that SYNs leave in increasing ID order (the
// peer refuses a SYN on an ID lower than one it has seen). st.mu is held.
func (s *Session) pushFirst(st *Stream, f frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return errSendClosed
	}
	st.id = s.nextID
	s.nextID += 2
	s.unsent--
	s.streams[st.id] = st
	f.id = st.id
	return s.push(f)
}

// finishWrite reports the writer's verdict on st's queued data to its
// waiting Write.
func (st *Stream) finishWrite(ok bool) {
	if ok {
		st.wres.Store(writeOK)
	} else {
		st.wres.Store(writeFailed)
	}
	notify(st.writeWake) // made before the data was queued
}

// cancelWrite withdraws st's queued data frame, if the writer has not taken
// it yet, and reports whether it did. A frame carrying the stream's SYN or
// ACK stays, emptied, so that the stream's opening keeps its place. The rest
// of a split frame is never withdrawn; when reset says that the stream is
// reset or the session ended, it is dropped, and the writer gives the
// verdict (frame.started).
func (s *Session) cancelWrite(st *Stream, reset bool) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for i := range s.queue {
		f := &s.queue[i]
		if f.owner != st {
			continue
		}
		if f.started {
			if reset {
				f.drop()
			}
			return false
		}
		if f.flags != 0 {
			f.data, f.owner, f.pipe, f.pipeN = nil, nil, nil, 0
		} else {
			n := copy(s.queue[i:], s.queue[i+1:])
			s.queue[i+n] = frame{}
			s.queue = s.queue[:i+n]
		}
		return true
	}
	return false
}

// writeLoop is the writer goroutine: it writes what is queued, and closes
// the connection when the session ends. A Write that finds the connection
// idle writes its frame itself instead (claimConn); the writer waits for it.
func (s *Session) writeLoop() {
	defer s.wg.Done()
	defer close(s.writerDone)
	defer s.conn.Close()
	defer s.lossWatch.end()
	defer s.failQueued()
	var batch []frame
	for {
		s.sendMu.Lock()
		for s.owned {
			// A Write has the connection (writeDirect); it signals when
			// done if anything waits.
			s.sendMu.Unlock()
			<-s.sendSignal
			s.sendMu.Lock()
		}
		if err := s.broken; err != nil {
			s.sendMu.Unlock()
			s.writeFailed(err)
			return
		}
		batch = s.takeLocked(batch[:0])
		s.queueGen++ // the copied frames taken no longer grow
		s.pongs = 0
		if s.refusals >= maxQueuedRefusals {
			notify(s.refusalsTaken)
		}
		s.refusals = 0
		final := s.sendClosed
		s.owned = len(batch) > 0
		s.sendMu.Unlock()

		// Only a session that says goodbye lingers: one that ends for
		// any other reason has a peer that is gone. (A GoAway for a
		// protocol error lingers only until the reader, which stopped at
		// the bad frame, is done: at once.)
		lingers := final && len(batch) > 0 && batch[len(batch)-1].typ == typeGoAway
		if len(batch) > 0 {
			err := s.writeBatch(batch, final)
			s.release(err)
			settle(batch, err == nil)
			clear(batch) // drop references to callers' buffers
			if err != nil {
				continue // to writeFailed
			}
		}
		if final {
			if lingers {
				s.linger()
			}
			return
		}
		select {
		case <-s.sendSignal:
		case <-s.done:
		}
	}
}

// batchBudget is about how many bytes of large data frames one batch
// takes (at least one frame) on a fast link; small and control frames need
// none. On a slow link the pacer lowers it (pacer.budget).
const batchBudget = 512 << 10

// takeLocked moves the next batch's frames from the queue to batch: every
// control frame and small data frame, and large data frames until about
// the batch budget (pacer.budget) is taken. The others stay queued, ahead
// of what is queued meanwhile, with every later frame of their streams (a
// stream's frames keep their order, and so do SYNs, which the peer wants
// in stream ID order). A small frame, such as an interactive stream's
// message, a FIN or a window update, then waits behind one batch of bulk
// data at most, not behind everything queued before it. On a slow link a
// large frame is split to fit the budget (the rest stays queued, started),
// so that the batch, and the wait, stays within about batchTime of the
// link. The session's last batch takes everything.
//
// When the large frames queued exceed the budget, the streams share it
// fairly (chooseLocked): a stream's message of a few pages does not wait
// for every bulk Write queued before it, which on a slow link is seconds
// per stream.
func (s *Session) takeLocked(batch []frame) []frame {
	if s.sendClosed {
		batch = append(batch, s.queue...)
		clear(s.queue)
		s.queue = s.queue[:0]
		return batch
	}
	budget := s.pace.budget()
	cuts := s.chooseLocked(budget)
	kept := s.queue[:0] // compacted in place: kept never passes i
	held, synHeld := &s.held, false
	held.reset()
	for i := range s.queue {
		f := s.queue[i]
		n := f.payloadLen()
		cut := cutWhole
		if cuts != nil && n > smallWrite {
			cut = cuts[i]
		}
		hold := false
		switch {
		case f.id == 0: // ping, GoAway
		case f.flags&flagSYN != 0 && synHeld, held.has(f.id):
			hold = true
		case cut == cutHold:
			hold = true
		}
		if !hold && cut > 0 {
			head, rest := f.split(cut)
			s.charge(&rest, cut)
			rest.fair = 0 // a share of its own, tagged at the next batch's clock
			batch = append(batch, head)
			f, hold = rest, true
		}
		if hold {
			kept = append(kept, f)
			held.add(f.id)
			synHeld = synHeld || f.flags&flagSYN != 0
			continue
		}
		if n > smallWrite {
			s.charge(&f, n)
		}
		batch = append(batch, f)
	}
	clear(s.queue[len(kept):])
	s.queue = kept
	return batch
}

// heldStreams is takeLocked's set of the streams with a frame held back:
// a slice while small, and a map past heldScan streams, so that a queue of
// thousands of busy streams costs a lookup per frame, not a scan.
type heldStreams struct {
	ids []uint32
	set map[uint32]struct{}
}

const heldScan = 32

func (h *heldStreams) reset() {
	h.ids = h.ids[:0]
	clear(h.set)
}

func (h *heldStreams) add(id uint32) {
	if len(h.ids) < heldScan {
		h.ids = append(h.ids, id)
		return
	}
	if h.set == nil {
		h.set = make(map[uint32]struct{})
	}
	h.set[id] = struct{}{}
}

func (h *heldStreams) has(id uint32) bool {
	if slices.Contains(h.ids, id) {
		return true
	}
	_, ok := h.set[id]
	return ok
}

// What takeLocked does with a large frame (chooseLocked): take it whole,
// hold it, or, if positive, split it after that many bytes.
const (
	cutWhole = 0
	cutHold  = -1
)

// fairPick is a large frame that chooseLocked may take: the queue index
// and the fair queue's tag.
type fairPick struct {
	tag uint64
	i   int
}

// chooseLocked decides which large frames the next batch takes, when
// together they exceed budget: nil if it takes them all, else what
// takeLocked does with the large frame at each queue index.
//
// The streams share the budget by fair queuing (self-clocked): a large
// frame's share starts at the session's fairClock when the frame is first
// seen, and its tag is that start plus the share it asks for (its size, at
// most the budget); the batch takes the frames of the lowest tags, and the
// clock moves to the end of the shares taken. A frame keeps its tag while
// it waits, and the rest of a split frame is tagged anew at the next
// batch, behind the frames that waited: busy streams take turns, a newly
// busy stream goes after those already waiting but ahead of the bulk data
// they will queue next, a smaller share goes ahead of a larger one queued
// at the same time, and newer streams cannot keep a frame waiting, since
// their shares start ever later. Each stream has one large frame queued at
// a time (a Write waits for its verdict). The last frame that does not
// fit is split to the budget's rest on a slow link, as takeLocked splits
// it; on a fast one it is taken whole if the budget is not spent.
//
// The order must not contradict what takeLocked holds back: SYNs leave in
// stream ID order, and a stream's frames in its order. So a large frame
// queued after a large SYN frame, as a SYN or on a stream whose SYN is,
// gets at least that SYN frame's tag (ties go in queue order): the frames
// taken are then never ones that takeLocked would hold, and the first
// pick always goes.
func (s *Session) chooseLocked(budget int) []int {
	total := 0
	picks := s.picks[:0]
	// synFloor is the highest tag of a large SYN frame so far. floors
	// holds, for each stream whose small SYN frame came after one, the
	// synFloor its SYN frame had: its large frame, which follows the SYN
	// (as a proxied connection's data follows its header), must not sort
	// before that. Only streams whose first Write is large, which
	// proxied connections' are not, set a floor.
	var synFloor uint64
	floors := s.floors
	clear(floors)
	for i := range s.queue {
		f := &s.queue[i]
		if f.id == 0 {
			continue // ping, GoAway
		}
		n := f.payloadLen()
		syn := f.flags&flagSYN != 0
		var floor uint64
		if syn {
			floor = synFloor
		} else if len(floors) > 0 {
			floor = floors[f.id]
		}
		if n <= smallWrite {
			if syn && floor > 0 {
				if floors == nil {
					floors = make(map[uint32]uint64)
					s.floors = floors
				}
				floors[f.id] = floor
			}
			continue
		}
		if f.fair == 0 {
			f.fair = s.fairClock + 1
		}
		tag := max(f.fair-1+uint64(min(n, budget)), floor)
		if syn {
			synFloor = tag
		}
		total += n
		picks = append(picks, fairPick{tag: tag, i: i})
	}
	s.picks = picks
	if total <= budget {
		return nil
	}
	slices.SortFunc(picks, func(a, b fairPick) int {
		if c := cmp.Compare(a.tag, b.tag); c != 0 {
			return c
		}
		return cmp.Compare(a.i, b.i)
	})
	cuts := slices.Grow(s.cuts[:0], len(s.queue))[:len(s.queue)]
	split := budget < batchBudget
	for _, p := range picks {
		f := &s.queue[p.i]
		n := f.payloadLen()
		switch k := max(budget, smallWrite); {
		case budget <= 0:
			cuts[p.i] = cutHold
		case split && n >= k+smallWrite && f.copied == nil:
			cuts[p.i] = k
			budget = 0
		default:
			cuts[p.i] = cutWhole
			budget -= n
		}
	}
	s.cuts = cuts
	return cuts
}

// charge records that the batch takes n bytes of f, a large frame that
// chooseLocked tagged: the clock moves to where that share ends, if that
// is later.
func (s *Session) charge(f *frame, n int) {
	s.fairClock = max(s.fairClock, f.fair-1+uint64(n))
}

// split cuts a data frame whose payload is not a copy after k bytes: the
// head, whose verdict nobody waits for, and the rest, which keeps the
// owner and loses the flags (they went with the head).
func (f *frame) split(k int) (head, rest frame) {
	head, rest = *f, *f
	head.owner = nil
	rest.flags, rest.started = 0, true
	if f.pipe != nil {
		head.pipeN, rest.pipeN = k, f.pipeN-k
	} else {
		head.data, rest.data = f.data[:k], f.data[k:]
	}
	return head, rest
}

// payloadLen returns the size of a data frame's payload.
func (f *frame) payloadLen() int {
	if f.pipe != nil {
		return f.pipeN
	}
	return len(f.payload())
}

// claimConn makes the caller the connection's owner if the connection is
// idle: no write in progress, nothing queued, the session not ending, and
// the caller's frame of n bytes within the batch budget when the link is
// slow (a larger one goes through the queue, to be split). The caller then
// writes its frame with writeDirect. This spares a frame of a lone busy
// stream (bulk data) two goroutine hand-offs: to the writer and back with
// its verdict.
func (s *Session) claimConn(n int) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.owned || len(s.queue) > 0 || s.sendClosed || s.broken != nil {
		return false
	}
	if b := s.pace.budget(); b < batchBudget && n > b {
		return false
	}
	s.owned = true
	return true
}

// writeDirect writes f, a data frame, on the caller's goroutine, which
// owns the connection (claimConn), and gives the connection back. A write
// error is the writer's to handle, as if it had failed its own write.
func (s *Session) writeDirect(f frame) error {
	s.direct[0] = f
	err := s.writeBatch(s.direct[:], false)
	s.direct[0] = frame{}
	s.directWrites.Add(1)
	s.release(err)
	return err
}

// release gives the connection up after a write, recording its error, and
// wakes the writer if frames were queued meanwhile, the session is ending,
// or the write failed.
func (s *Session) release(err error) {
	s.sendMu.Lock()
	s.owned = false
	if err != nil && s.broken == nil {
		s.broken = fmt.Errorf("mux: write: %w", err)
	}
	wake := len(s.queue) > 0 || s.sendClosed || s.broken != nil
	s.sendMu.Unlock()
	if wake {
		notify(s.sendSignal)
	}
}

// failQueued gives the Writes whose frames are still queued when the writer
// ends (after a failed write, or a last batch cut short) their verdict:
// not written. Nothing is queued after the writer ends: the session is
// closed for sending by then.
func (s *Session) failQueued() {
	s.sendMu.Lock()
	s.sendClosed = true
	left := s.queue
	s.queue = nil
	s.sendMu.Unlock()
	settle(left, false)
}

// settle gives the Writes of frames the writer took from the queue their
// verdict, and returns the buffers of copied payloads to their pool.
func settle(frames []frame, ok bool) {
	for i := range frames {
		frames[i].verdict(ok)
		if c := frames[i].copied; c != nil {
			putBuf(c)
		}
	}
}

// maxLinger bounds how long a closed session keeps its TCP connection
// open after its last write (linger).
const maxLinger = 2 * time.Second

// linger keeps a TCP connection open after the session's last write, with
// its sending side shut (a FIN after the GoAway), until the peer closes
// its side or its kernel has acknowledged everything: meanwhile the reader
// reads, and drops, whatever the peer still sends. Closing at once would
// not do: the kernel resets a socket closed with data unsent as soon as
// the peer sends anything more (a window update, a stream's data), or at
// once if data it sent was left unread, and the reset discards what was
// unsent. The peer's session would then fail with a reset, not end with
// the GoAway, whenever the GoAway waits in the socket's queue: on a slow
// link, or behind the last batch. Once acknowledged, the GoAway is in the
// peer's receive queue, which a reset does not take back. A peer that
// does not take what is left holds the connection maxLinger; one that
// takes it and does not close, goAwayWait at most.
func (s *Session) linger() {
	if s.tcp == nil || !shutdownWrite(s.tcp) {
		return
	}
	limit := time.Now().Add(maxLinger)
	t := time.NewTimer(goAwayWait)
	defer t.Stop()
	for {
		select {
		case <-s.readerDone:
			return
		case now := <-t.C:
			if delivered, ok := tcpAllAcked(s.tcp); delivered || !ok || !now.Before(limit) {
				return
			}
			t.Reset(min(goAwayWait, limit.Sub(now)))
		}
	}
}

// writeFailed ends the session after a failed write; nothing more is
// written. A write that timed out ends it at once. A connection that broke
// (the peer closed or reset it) may still hold what the peer sent before,
// such as a stream's last data and FIN, which must not turn into a reset:
// the reader gets goAwayWait to read it, and then ends the session with
// the write's error.
func (s *Session) writeFailed(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.shutdown(err, false, 0)
		return
	}
	s.mu.Lock()
	s.writeErr = err
	s.mu.Unlock()
	_ = s.conn.SetReadDeadline(time.Now().Add(goAwayWait))
	<-s.done
}

// writeBatch writes batch within the write timeout: WriteTimeout without
// progress (see writeProgress), or goAwayWait in all once the session is
// closing. Only the connection's owner calls it.
func (s *Session) writeBatch(batch []frame, final bool) error {
	timeout := s.cfg.WriteTimeout
	if final {
		timeout = goAwayWait
	}
	// A connection without deadlines still works, without the timeout; a
	// closed one fails the write below.
	start := time.Now()
	_ = s.conn.SetWriteDeadline(start.Add(timeout))
	if !final && s.closing.Load() {
		// shutdown shortened the deadline just before ours replaced it.
		_ = s.conn.SetWriteDeadline(time.Now().Add(goAwayWait))
	}
	s.bw.final = final
	s.writeWait.Store(s.clock() + 1)
	if !final {
		s.lossWatch.start(s)
	}
	// Counted before the write, which hands the frames' buffers back.
	n := dataBytes(batch)
	err := s.bw.write(batch)
	s.writeWait.Store(0)
	if err == nil {
		s.counters.sent.Add(n)
		now := time.Now()
		s.pace.observe(int(n), now.Sub(start), now)
	}
	return err
}

// The pacer keeps a batch to about batchTime of the link. A batch is
// written whole before the writer takes the next, so what is queued
// meanwhile (an interactive stream's message, a window update, a new
// stream's SYN) waits for all of it: 512 KiB is a millisecond on a LAN
// but eight seconds at half a megabit. The pacer sets the budget to
// batchTime of the link's rate, within [minBatchBudget, batchBudget].
// Until the first measurement it is batchBudget: a fast link is not held
// back while it is measured, at the cost of one unpaced batch on a slow
// one.
//
// On a TCP connection (under TLS too) the rate is the kernel's: the bytes
// the peer acknowledged per second (TCP_INFO), sampled after a write at
// most every paceWindow. Timing writes would not do: the kernel's send
// buffer, autotuned to megabytes, takes a slow link's data without
// waiting, and on a busy host a descheduled writer makes a fast link look
// slow. An interval in which the socket cannot have run out of unsent
// data measures the link, or the peer's reading: the socket held unsent
// data at both ends, and in between it sent less for the first time than
// it held at the start, or the writer waited for it most of the time. Any
// other interval may include idle time and measures what the session
// offered, which raises the budget but never lowers it. Kernels before
// 4.19 (no bytes_sent in TCP_INFO) never lower a TCP connection's budget.
//
// While the budget is lowered, the socket's unsent bytes are held to two
// batches (TCP_NOTSENT_LOWAT): otherwise what the writer orders, a small
// frame before bulk data, would wait behind seconds of data in the
// kernel. A fast link's queue is left to the kernel, and so is a closing
// session's (shutdown): what it writes has goAwayWait in all.
//
// Elsewhere (a Unix socket, a pipe) the rate is that of the writes: the
// data bytes written per second spent writing, over paceWindow of it or
// paceBytes written, whichever comes first.
const (
	batchTime      = 50 * time.Millisecond
	paceWindow     = 100 * time.Millisecond
	paceBytes      = 4 << 20
	minBatchBudget = 4 << 10
	// paceStale is the longest interval a TCP sample measures: over a
	// longer one the writer may have idled, and the rate says little.
	paceStale = 5 * time.Second
)

// pacer measures the connection's rate for takeLocked. observe belongs to
// the connection's owner; budget may be read by anyone.
type pacer struct {
	limit atomic.Int64 // the budget; 0 until the first measurement

	busy time.Duration // spent writing since the last measurement

	// By the writes' time, without tcp.
	bytes int // data bytes written since the last measurement

	// By TCP_INFO, with tcp.
	tcp        func() (tcpPace, bool)
	limitQueue func(bytes int)     // TCP_NOTSENT_LOWAT; 0: the system's default
	queued     int                 // the last limitQueue
	capRTO     func(time.Duration) // TCP_RTO_MAX_MS (retransmitCap)
	rtoCap     time.Duration       // the last capRTO
	last       time.Time           // the last sample
	lastTCP    tcpPace
}

// tcpPace is what the pacer reads from TCP_INFO.
type tcpPace struct {
	acked   uint64 // bytes the peer acknowledged
	sent    uint64 // bytes sent for the first time
	notSent uint32 // bytes held, not sent yet
	// rto is the retransmission timeout the kernel computes from the
	// round trip (srtt + 4 rttvar, the deviation's part at least 200ms),
	// before any backoff.
	rto time.Duration
}

// observe records a write of n data bytes that took d, ending at now.
func (p *pacer) observe(n int, d time.Duration, now time.Time) {
	p.busy += d
	if p.tcp != nil {
		p.sample(now)
		return
	}
	p.bytes += n
	if p.busy < paceWindow && p.bytes < paceBytes {
		return
	}
	p.set(float64(p.bytes) / max(p.busy, time.Microsecond).Seconds())
	p.busy, p.bytes = 0, 0
}

// sample measures the rate at which the peer acknowledges data.
func (p *pacer) sample(now time.Time) {
	elapsed := now.Sub(p.last)
	if elapsed < paceWindow {
		return
	}
	cur, ok := p.tcp()
	if !ok {
		return
	}
	prev, busy := p.lastTCP, p.busy
	p.last, p.lastTCP, p.busy = now, cur, 0
	if c := retransmitCap(cur.rto); p.capRTO != nil && c != p.rtoCap {
		p.capRTO(c)
		p.rtoCap = c
	}
	if elapsed > paceStale || cur.acked < prev.acked || cur.sent < prev.sent {
		return
	}
	rate := float64(cur.acked-prev.acked) / elapsed.Seconds()
	// The socket had unsent data all along if it held some at both ends
	// and, in between, either sent less than it held at the start, or
	// made the writer wait most of the time (a small send buffer).
	behind := prev.notSent > 0 && cur.notSent > 0 &&
		(cur.sent-prev.sent < uint64(prev.notSent) || busy >= elapsed/2)
	switch {
	case behind:
		p.set(rate) // the link's rate, or the peer's reading
	case rate*batchTime.Seconds() > float64(p.budget()):
		p.set(rate) // the link took more than the budget assumed
	}
}

// set sets the budget to batchTime of rate (bytes per second).
func (p *pacer) set(rate float64) {
	budget := int(min(max(rate*batchTime.Seconds(), minBatchBudget), batchBudget))
	p.limit.Store(int64(budget))
	queue := 0
	if budget < batchBudget {
		queue = 2 * budget
	}
	if p.limitQueue != nil && queue != p.queued {
		p.limitQueue(queue)
		p.queued = queue
	}
}

// budget returns the bytes of large frames a batch may take.
func (p *pacer) budget() int {
	if b := p.limit.Load(); b > 0 {
		return int(b)
	}
	return batchBudget
}

// A session caps its TCP connection's retransmission timeout. The kernel
// doubles the timeout after every retransmission that goes unanswered,
// and a session's connection carries every stream between two hosts: a
// few losses in a row on a congested link, or an outage, would hold all of
// them for the backed-off timeout, often long after the link works again
// (after a 15s outage, the next try came 12s after the link was back).
// With the cap the connection tries at least that often. The cap is twice
// the timeout the kernel computes from the round trip (srtt + 4 rttvar),
// and at least minRetransmitCap: the backoff still runs a doubling or two
// past it, and a link whose round trip grows to seconds (a deep queue)
// gets no spurious retransmissions from the cap. The pacer follows the
// round trip as it samples TCP_INFO.
//
// The kernel gives up on a connection after retransmitting for the time a
// model of its uncapped backoff gives (about 15 minutes), counted from
// the original sending of the oldest segment it retransmitted: the cap
// would shorten that to about 27s, and on a lossy link, where one
// recovery follows another while data flows, that start can lie far
// back; a soak saw a session end so. Where the kernel takes the cap the
// session sets the uncapped time itself (TCP_USER_TIMEOUT, kernelGiveUp),
// and hands the socket back to the kernel's bounds for a closed socket
// when it ends (shutdown). Its own deadlines, which count from the last
// progress, end a session whose link is dead long before.
const (
	minRetransmitCap = 2 * time.Second
	maxRetransmitCap = 120 * time.Second // the kernel's own, and most it takes
)

// retransmitCap returns the cap on the retransmission timeout of a
// connection whose kernel computes rto: twice that, rounded up to whole
// seconds, within [minRetransmitCap, maxRetransmitCap].
func retransmitCap(rto time.Duration) time.Duration {
	c := (2*rto + time.Second - 1).Truncate(time.Second)
	return min(max(c, minRetransmitCap), maxRetransmitCap)
}

// writeProgress moves the write deadline WriteTimeout on after part of a
// batch was written: the timeout detects a peer that stops reading, and a
// batch that a slow link takes longer than WriteTimeout to carry (many
// streams' windows' worth) is no such peer. A closing session's last
// write keeps its short deadline.
func (s *Session) writeProgress() {
	if s.bw.final || s.closing.Load() {
		return
	}
	s.writeWait.Store(s.clock() + 1)
	_ = s.conn.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	if s.closing.Load() {
		_ = s.conn.SetWriteDeadline(time.Now().Add(goAwayWait))
	}
}

// lossWatch looks at a TCP connection's TCP_INFO while a write waits on
// it, every watchInterval, for two things the write itself cannot see.
//
// Progress that frees no room yet: a socket's writer wakes only once about
// a third of its send buffer has drained, which on a slow link with an
// autotuned buffer (megabytes) can take longer than WriteTimeout while the
// peer takes data all along. Bytes the peer acknowledged since the last
// look count as progress: the deadline moves on, and the session is not
// Stalled.
//
// Loss recovery: after a link outage or a burst of losses the kernel's
// retransmission timeout backs off (0.2s, 0.4s, ... 6.4s), so a link that
// is back may carry nothing for longer than WriteTimeout, and every stream
// of the session would be reset for a blip. While the kernel retransmits
// data in flight, the deadline moves on, up to maxLossWait since the last
// progress. A peer that does not read acknowledges everything and closes
// its window: it gets WriteTimeout, as before. Either way the session is
// Stalled meanwhile, and the node opens new streams elsewhere.
type lossWatch struct {
	timer *time.Timer // made by the first start, under once
	once  sync.Once
	armed atomic.Bool   // the timer is set to fire
	acked atomic.Uint64 // the peer's acknowledged bytes at the last look
}

// watchInterval is how often lossWatch looks, at most: often enough that
// a working slow link never looks Stalled for long (stallAvoid in package
// channels is 2s), at one getsockopt per look.
const watchInterval = 500 * time.Millisecond

func (s *Session) watchEvery() time.Duration { return min(s.cfg.WriteTimeout/2, watchInterval) }

// maxLossWait bounds how long a write may wait on a connection recovering
// from loss: TCP itself would retry for minutes, but the streams of a
// session whose link carries nothing for this long are better reset, so
// that their programs can try again; the keepalive would end such a
// session after its own bound anyway.
func (s *Session) maxLossWait() time.Duration {
	return max(2*s.cfg.WriteTimeout, s.cfg.KeepAliveInterval+s.cfg.KeepAliveTimeout)
}

// start arms the watch for a write that begins. The timer is set only
// when it is not already: a busy session pays an atomic load per write,
// and one timer reset per watchInterval.
func (w *lossWatch) start(s *Session) {
	if s.tcp == nil {
		return
	}
	if !w.armed.Load() && w.armed.CompareAndSwap(false, true) {
		w.once.Do(func() { w.timer = time.AfterFunc(time.Hour, func() { w.check(s) }) })
		if w.timer != nil { // nil: the writer has ended (end)
			w.timer.Reset(s.watchEvery())
		}
	}
}

// end stops the timer for good: the session's writer has ended.
func (w *lossWatch) end() {
	w.once.Do(func() {}) // no timer made after this
	if w.timer != nil {
		w.timer.Stop()
	}
}

// check runs watchEvery after start, and again while writes wait. armed
// is cleared before the write's state is read, so that a write starting
// meanwhile finds the timer unarmed and sets it.
func (w *lossWatch) check(s *Session) {
	w.armed.Store(false)
	since := s.writeWait.Load()
	if since == 0 || s.closing.Load() {
		return
	}
	acked, recovering, ok := tcpSendState(s.tcp)
	if !ok {
		return
	}
	now := time.Now()
	if prev := w.acked.Swap(acked); acked != prev {
		// The peer took data since the last look. (The first look after
		// a pause compares with an older one: it may grant the write one
		// interval more than it earned.)
		if cur := s.clock() + 1; s.writeWait.CompareAndSwap(since, cur) {
			w.setDeadline(s, cur, now.Add(s.cfg.WriteTimeout))
		}
	} else if limit := s.start.Add(time.Duration(since-1) + s.maxLossWait()); recovering && now.Before(limit) {
		// The deadline goes at most maxLossWait past the last progress.
		next := now.Add(s.cfg.WriteTimeout)
		if next.After(limit) {
			next = limit
		}
		w.setDeadline(s, since, next)
		s.limits.lossWaits.Add(1)
	}
	if w.armed.CompareAndSwap(false, true) {
		w.timer.Reset(s.watchEvery())
	}
}

// setDeadline moves the write deadline to t for the write whose wait
// began, or last progressed, at since. A write that began meanwhile set
// its own deadline, which t must not cut short (hence the look after
// setting t); a closing session keeps its short one.
func (w *lossWatch) setDeadline(s *Session, since int64, t time.Time) {
	_ = s.conn.SetWriteDeadline(t)
	if cur := s.writeWait.Load(); cur != since && cur != 0 {
		_ = s.conn.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	}
	if s.closing.Load() {
		_ = s.conn.SetWriteDeadline(time.Now().Add(goAwayWait))
	}
}

// Stalled returns how long the connection has carried nothing: the write
// in progress has waited that long without progress, or, over TCP, the
// kernel retransmits data after a timeout and has heard no acknowledgement
// for that long (data that fit in the socket's buffer stalls too); 0 when
// neither. Its causes: a link that carries nothing for a while (an outage,
// TCP backing off after losses), or a peer that does not read.
func (s *Session) Stalled() time.Duration {
	d := time.Duration(0)
	if since := s.writeWait.Load(); since != 0 {
		d = max(time.Duration(s.clock()-(since-1)), 0)
	}
	if s.tcp != nil {
		d = max(d, s.cachedSilence())
	}
	return d
}

// silenceCache is how long a TCP_INFO reading serves Stalled: a node asks
// for each session at every stream it opens.
const silenceCache = 100 * time.Millisecond

// cachedSilence returns tcpSilence(s.tcp), read at most every
// silenceCache.
func (s *Session) cachedSilence() time.Duration {
	now := s.clock()
	if at := s.silenceAt.Load(); at != 0 && now-at < int64(silenceCache) {
		if d := time.Duration(s.silence.Load()); d > 0 {
			return d + time.Duration(now-at) // the silence went on
		}
		return 0
	}
	d := tcpSilence(s.tcp)
	s.silence.Store(int64(d))
	s.silenceAt.Store(now)
	return d
}

// batchWriter encodes a batch of frames and writes it in as few writes as
// it can: one sendmsg on a socket (one per 1024 pieces); on other
// connections (TLS, pipes) the pieces are gathered into a flat buffer,
// since their Write call is costly (a TLS record each). Every write that
// makes progress moves the write deadline on (progress).
type batchWriter struct {
	conn     net.Conn
	raw      syscall.RawConn // for frames whose payload is in a pipe
	sock     *sockWriter     // nil: not a socket, or not Linux
	gather   Gatherer        // nil: conn does not gather its writes
	progress func()
	out      *atomic.Uint64 // counts the bytes written
	final    bool           // the session's last batch: no progress extends its deadline
	maxFrame int

	hdrs []byte   // encoded headers of the batch
	off  int      // used part of hdrs
	iov  [][]byte // pieces to write: header runs and payloads
	run  bool     // iov's last piece is a header run ending at hdrs[off]
}

func newBatchWriter(conn net.Conn, raw syscall.RawConn, maxFrame int, progress func(), out *atomic.Uint64) *batchWriter {
	g, _ := conn.(Gatherer)
	return &batchWriter{conn: conn, raw: raw, sock: newSockWriter(conn, progress, out), gather: g, progress: progress, out: out, maxFrame: maxFrame}
}

// Gatherer is a connection whose every Write costs system calls that it
// can save by holding written bytes back: a TLS connection, whose Write
// seals records and sends each Write's records at once. The session writes
// a batch of frames between Gather and Flush, so that the records of the
// whole batch leave in as few system calls (and as large TCP segments) as
// the connection can make; it still writes at most 16 KiB per Write, so
// that the write deadline moves on with the writes (the connection bounds
// what it holds back before writing).
type Gatherer interface {
	// Gather holds back the bytes of the Writes that follow.
	Gather()
	// Flush sends what was held back, and ends the gathering.
	Flush() error
}

func (w *batchWriter) write(batch []frame) error {
	n := 0
	for i := range batch {
		n += w.frames(&batch[i])
	}
	if cap(w.hdrs) < n*headerSize {
		w.hdrs = make([]byte, n*headerSize)
	}
	w.hdrs = w.hdrs[:cap(w.hdrs)]
	w.off, w.run = 0, false
	for i := range batch {
		f := &batch[i]
		if f.dropped {
			continue
		}
		if f.typ != typeData {
			w.addHeader(f.header)
			continue
		}
		if f.pipe != nil {
			if err := w.splice(f, i < len(batch)-1); err != nil {
				w.clearIOV()
				return err
			}
			continue
		}
		h, data := f.header, f.payload()
		for first := true; first || len(data) > 0; first = false {
			k := min(len(data), w.maxFrame)
			h.length = uint32(k)
			w.addHeader(h)
			if k > 0 {
				w.iov = append(w.iov, data[:k])
				w.run = false
			}
			data = data[k:]
			h.flags = 0
		}
	}
	var err error
	switch {
	case len(w.iov) == 0: // everything went out with the last spliced frame
	case w.sock != nil:
		err = w.sock.write(w.iov, 0)
	default:
		err = w.writeFlat()
	}
	w.clearIOV()
	return err
}

func (w *batchWriter) clearIOV() {
	clear(w.iov)
	w.iov = w.iov[:0]
	w.run = false
}

// splice writes a frame whose payload is in a pipe: what the batch has
// gathered so far, with this frame's header, goes first with MSG_MORE (the
// kernel holds it for the payload), then the payload is spliced from the
// pipe. more says that other frames follow in this batch.
func (w *batchWriter) splice(f *frame, more bool) error {
	h := f.header
	h.length = uint32(f.pipeN)
	w.addHeader(h)
	if err := w.sock.write(w.iov, msgMore); err != nil {
		return err
	}
	w.clearIOV()
	w.progress()
	if err := drainPipe(w.raw, f.pipe, f.pipeN, more, w.progress); err != nil {
		return err
	}
	w.out.Add(uint64(f.pipeN))
	return nil
}

// frames returns how many frames (headers) f is sent as.
func (w *batchWriter) frames(f *frame) int {
	if f.dropped {
		return 0
	}
	n := len(f.payload())
	if f.typ != typeData || n == 0 { // including pipe frames
		return 1
	}
	return (n + w.maxFrame - 1) / w.maxFrame
}

// addHeader encodes h after the previous headers; consecutive headers form
// one piece.
func (w *batchWriter) addHeader(h header) {
	b := w.hdrs[w.off : w.off+headerSize]
	h.encode(b)
	w.off += headerSize
	if w.run {
		last := &w.iov[len(w.iov)-1]
		*last = (*last)[:len(*last)+headerSize]
		return
	}
	w.iov = append(w.iov, b)
	w.run = true
}

// flatChunk is the most a write to a connection other than a socket
// carries: the write deadline moves on after each, so it bounds the bytes
// a link must carry within WriteTimeout (and, on a connection that is not
// over TCP, within KeepAliveTimeout). It is a TLS record's payload: on TLS
// a larger write makes more records anyway, each written on its own.
const flatChunk = 16 << 10

// writeFlat writes iov through a pooled buffer: small pieces are gathered,
// and a piece at least as large as the buffer is written from where it
// is, in writes of at most flatChunk bytes.
func (w *batchWriter) writeFlat() error {
	if w.gather == nil {
		return w.writeChunks()
	}
	w.gather.Gather()
	err := w.writeChunks()
	if ferr := w.gather.Flush(); err == nil {
		err = ferr
	}
	return err
}

// writeChunks writes iov as writeFlat says, each Write on its own.
func (w *batchWriter) writeChunks() error {
	bp := getBuf(flatChunk)
	defer putBuf(bp)
	buf := (*bp)[:0]
	written := false
	write := func(b []byte) error {
		if written {
			w.progress()
		}
		written = true
		n, err := w.conn.Write(b)
		w.out.Add(uint64(n))
		return err
	}
	for _, p := range w.iov {
		for len(p) > 0 {
			if len(buf) == 0 && len(p) >= cap(buf) {
				if err := write(p[:cap(buf)]); err != nil {
					return err
				}
				p = p[cap(buf):]
				continue
			}
			k := copy(buf[len(buf):cap(buf)], p)
			buf, p = buf[:len(buf)+k], p[k:]
			if len(buf) == cap(buf) {
				if err := write(buf); err != nil {
					return err
				}
				buf = buf[:0]
			}
		}
	}
	if len(buf) > 0 {
		return write(buf)
	}
	return nil
}
