package mux

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Session is one multiplexed connection. Both ends open streams on it.
type Session struct {
	conn   net.Conn
	raw    syscall.RawConn // conn's socket, when splice can use it; else nil
	cfg    Config
	log    *slog.Logger
	client bool      // we dialed: our stream IDs are odd
	start  time.Time // origin of clock

	done       chan struct{} // closed when the session ends
	writerDone chan struct{} // closed when the writer goroutine returns
	readerDone chan struct{} // closed when the reader goroutine returns
	wg         sync.WaitGroup

	mu          sync.Mutex
	err         error              // why the session ended; nil while open
	writeErr    error              // a failed write, until the reader ends the session (writeFailed)
	streams     map[uint32]*Stream // streams with frames exchanged, not finished
	nextID      uint32             // ID of our next outbound stream
	idsLeft     uint32             // outbound IDs not yet promised to OpenStream
	unsent      int                // streams opened that have not sent a frame
	inbound     int                // streams in streams that the peer opened
	lastInbound uint32             // highest stream ID the peer opened
	pings       map[uint32]chan struct{}
	pingID      uint32

	acceptCh chan *Stream
	// openSlots holds a token for each stream we opened that the peer has
	// not accepted yet (Config.MaxPendingOpens): OpenStream waits for
	// room. Waiting senders are served in order, one per token released.
	openSlots chan struct{}

	rtt      atomic.Int64  // smoothed round-trip time in ns; 0 until measured
	framesIn atomic.Uint64 // frames received
	counters counters      // stream bytes each way (stats.go)
	// bytesIn counts the bytes received, payloads included: the
	// keepalive's sign of life, since a large frame on a slow link takes
	// long to arrive, and so does a pong queued behind it.
	bytesIn atomic.Uint64
	// bytesOut counts the bytes written to the connection; with tcp, the
	// TCP socket under it (TLS or not), they tell the keepalive that the
	// peer takes what we send (peerTook).
	bytesOut atomic.Uint64
	tcp      syscall.RawConn
	// Frames that skipped a goroutine hand-off: written by their stream's
	// goroutine (writeDirect), and received ones that the reader spliced
	// on to WriteTo's socket (deliverLocked). Tests read them.
	directWrites, deliveries atomic.Uint64
	limits                   limitCounters
	mem                      memBudget // received data not yet read (budget.go)

	// The send queue (writer.go).
	sendMu   sync.Mutex
	queue    []frame
	queueGen uint64      // counts the writer's takings of queue
	held     heldStreams // takeLocked's scratch: streams with frames held back
	// fairClock is the fair queue's virtual clock: the furthest end of a
	// share of large frames taken (charge). picks, floors and cuts are
	// chooseLocked's scratch.
	fairClock  uint64
	picks      []fairPick
	floors     map[uint32]uint64
	cuts       []int
	sendClosed bool // the session ended: no more frames are queued
	pongs      int  // pongs in queue
	refusals   int  // resets refusing inbound streams in queue
	sendSignal chan struct{}
	// refusalsTaken wakes the reader waiting for the writer to take
	// maxQueuedRefusals refusals (refuse).
	refusalsTaken chan struct{}
	refusalLog    refusalLog // the reader's
	closing       atomic.Bool
	// owned says that a goroutine is writing to the connection: the writer
	// with a batch, or a Write with its own frame (writeDirect). Only the
	// owner uses bw and direct, and feeds pace.
	owned  bool
	bw     *batchWriter
	direct [1]frame
	pace   pacer
	// broken is the first failed write: nothing more is written, and the
	// writer ends the session with it (writeFailed).
	broken error
	// writeWait is the session clock plus one when the write in
	// progress started or last made progress; 0 when none is in progress
	// (Stalled).
	writeWait atomic.Int64
	// silence is the last tcpSilence read, at silenceAt on the session
	// clock (Stalled).
	silence, silenceAt atomic.Int64
	// lossWatch moves a waiting write's deadline on while TCP recovers
	// from loss (counted in limits.lossWaits).
	lossWatch lossWatch
}

// Client starts the dialer's side of a session over conn: its streams have
// odd IDs. The session owns conn from now on.
func Client(conn net.Conn, cfg Config) (*Session, error) { return newSession(conn, cfg, true) }

// Server starts the listener's side of a session over conn: its streams
// have even IDs. The session owns conn from now on.
func Server(conn net.Conn, cfg Config) (*Session, error) { return newSession(conn, cfg, false) }

func newSession(conn net.Conn, cfg Config, client bool) (*Session, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Session{
		conn:       conn,
		cfg:        cfg,
		log:        cfg.Logger,
		client:     client,
		start:      time.Now(),
		done:       make(chan struct{}),
		writerDone: make(chan struct{}),
		readerDone: make(chan struct{}),
		streams:    make(map[uint32]*Stream),
		nextID:     2,
		acceptCh:   make(chan *Stream, cfg.AcceptBacklog),
		openSlots:  make(chan struct{}, cfg.MaxPendingOpens),
		sendSignal: make(chan struct{}, 1),

		refusalsTaken: make(chan struct{}, 1),
	}
	s.mem.max = cfg.MaxBuffered
	if client {
		s.nextID = 1
	}
	if spliceSupported && !cfg.NoSplice {
		s.raw = rawConn(conn)
	}
	s.bw = newBatchWriter(conn, s.raw, int(cfg.MaxFrame), s.writeProgress, &s.bytesOut)
	if s.tcp = tcpConn(conn); s.tcp != nil {
		if setRetransmitCap(s.tcp, minRetransmitCap) {
			// A kernel without the cap keeps its own give-up time.
			setUserTimeout(s.tcp, kernelGiveUp())
			s.pace.capRTO = func(d time.Duration) { setRetransmitCap(s.tcp, d) }
			s.pace.rtoCap = minRetransmitCap
		}
		s.pace.tcp = func() (tcpPace, bool) { return tcpPaceState(s.tcp) }
		s.pace.limitQueue = func(n int) {
			if !s.closing.Load() { // shutdown gave the queue back to the kernel
				setNotSentLowat(s.tcp, n)
			}
		}
	}
	s.idsLeft = (math.MaxUint32-s.nextID)/2 + 1
	s.wg.Add(3)
	go s.readLoop()
	go s.writeLoop()
	go s.keepalive()
	return s, nil
}

// clock is the session's monotonic time in nanoseconds.
func (s *Session) clock() int64 { return int64(time.Since(s.start)) }

// OpenStream returns a new stream. It sends nothing: the stream's SYN rides
// on its first frame (its first Write, CloseWrite, Close or window update),
// which is also when it gets its ID. While MaxPendingOpens streams opened
// here wait for the peer to accept them, it waits for one of them to be
// accepted or to end, in the order of the calls, until ctx is done. It
// fails once the session has ended, which includes the peer sending GoAway.
func (s *Session) OpenStream(ctx context.Context) (*Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("mux: open stream: %w", err)
	}
	select {
	case s.openSlots <- struct{}{}:
	default:
		select {
		case s.openSlots <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("mux: open stream: waiting for the peer to accept %d streams: %w", cap(s.openSlots), ctx.Err())
		case <-s.done:
			return nil, fmt.Errorf("mux: open stream: %w", s.closedErr())
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil && s.idsLeft > 0 {
		s.idsLeft--
		s.unsent++
		return newStream(s, 0, stOutbound|stPending), nil
	}
	<-s.openSlots
	if s.err != nil {
		return nil, fmt.Errorf("mux: open stream: %w", s.closedErrLocked())
	}
	return nil, fmt.Errorf("mux: open stream: stream IDs exhausted")
}

// AcceptStream returns the next stream the peer opened, and tells the peer
// that it was accepted (ACK), which lets the peer open another one
// (Config.MaxPendingOpens).
func (s *Session) AcceptStream(ctx context.Context) (*Stream, error) {
	select {
	case <-s.done:
		return nil, fmt.Errorf("mux: accept stream: %w", s.closedErr())
	default:
	}
	select {
	case st := <-s.acceptCh:
		st.mu.Lock()
		st.ackLocked()
		st.mu.Unlock()
		return st, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("mux: accept stream: %w", ctx.Err())
	case <-s.done:
		return nil, fmt.Errorf("mux: accept stream: %w", s.closedErr())
	}
}

// Close ends the session: it resets every stream, writes what was queued
// (such as a FIN from CloseWrite) and GoAway, best effort within 100ms,
// and closes the connection. Over TCP it first waits for the peer to close
// its side, or to acknowledge all that was sent: 2s at most (see linger).
// What was queued for a stream with no FIN queued is not written: the
// peer would drop it. It returns once the session's goroutines have
// ended, and always nil.
func (s *Session) Close() error {
	s.shutdown(ErrSessionClosed, true, goAwayNormal)
	// The writer closes the connection after the GoAway (and, over TCP,
	// the linger), unless the connection ignores write deadlines.
	wait := 2 * goAwayWait
	if s.tcp != nil {
		wait += maxLinger
	}
	t := time.NewTimer(wait)
	select {
	case <-s.writerDone:
	case <-t.C:
		_ = s.conn.Close()
	}
	t.Stop()
	s.wg.Wait()
	return nil
}

// CloseChan returns a channel closed when the session ends.
func (s *Session) CloseChan() <-chan struct{} { return s.done }

// IsClosed reports whether the session has ended.
func (s *Session) IsClosed() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Err returns why the session ended, nil while it is open: ErrSessionClosed
// after Close, or an error matching ErrRemoteGoAway, ErrProtocol or
// ErrKeepAliveTimeout, or wrapping the connection's error.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// NumStreams returns the number of streams not yet finished: opened (by
// either side) and not yet ended in both directions or reset.
func (s *Session) NumStreams() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.streams) + s.unsent
}

// LocalAddr returns the connection's local address.
func (s *Session) LocalAddr() net.Addr { return s.conn.LocalAddr() }

// RemoteAddr returns the connection's remote address.
func (s *Session) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// closedErr returns the error of session operations after its end.
func (s *Session) closedErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closedErrLocked()
}

func (s *Session) closedErrLocked() error {
	if s.err == nil || s.err == ErrSessionClosed {
		return ErrSessionClosed
	}
	// %v, not %w: the cause may wrap io.EOF, which must not leak into
	// errors that callers test for a clean end.
	return fmt.Errorf("%w: %v", ErrSessionClosed, s.err)
}

// cause returns why the session ended.
func (s *Session) cause() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		return ErrSessionClosed
	}
	return s.err
}

// shutdown ends the session with cause, at most once: it stops the
// queueing of frames, queues GoAway with code after the frames already
// queued if sendGoAway (else it drops them, failing their Writes), lets the
// writer write them and close the connection (which ends the reader), and
// resets every stream. It does not wait for the goroutines, so any of them
// may call it.
func (s *Session) shutdown(cause error, sendGoAway bool, code uint32) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = cause
	streams := s.streams
	s.streams = nil
	s.unsent, s.inbound = 0, 0
	s.pings = nil
	s.mu.Unlock()

	// Cut short a write blocked on a peer that does not read; the writer
	// checks closing after setting its own deadline.
	s.closing.Store(true)
	_ = s.conn.SetWriteDeadline(time.Now().Add(goAwayWait))
	if s.tcp != nil {
		// The pace no longer matters: the kernel may take what is left.
		setNotSentLowat(s.tcp, 0)
		// Once closed, the socket lingers with what it could not send:
		// the kernel's own bound for a closed socket applies again
		// (tcp_orphan_retries, seconds with the cap), not the long one.
		setUserTimeout(s.tcp, 0)
	}
	s.sendMu.Lock()
	var dropped []frame
	if sendGoAway {
		// What is queued goes first, so that a FIN queued before Close
		// still reaches the peer: all of it within goAwayWait. The data
		// of streams with no FIN queued does not: the GoAway resets the
		// peer's streams, which drop it, and on a slow link it would hold
		// the GoAway back for seconds.
		var ending map[uint32]bool
		for i := range s.queue {
			if s.queue[i].flags&flagFIN != 0 {
				if ending == nil {
					ending = make(map[uint32]bool)
				}
				ending[s.queue[i].id] = true
			}
		}
		dropped = s.dropQueuedLocked(func(f *frame) bool { return f.typ == typeData && !ending[f.id] })
		s.queue = append(s.queue, frame{header: header{typ: typeGoAway, length: code}})
	} else {
		dropped = s.dropQueuedLocked(func(*frame) bool { return true })
	}
	s.sendClosed = true
	s.sendMu.Unlock()
	settle(dropped, false)
	close(s.done)
	notify(s.sendSignal)
	for _, st := range streams {
		st.mu.Lock()
		st.sessionEndedLocked(cause)
		st.mu.Unlock()
	}
}

// dropQueuedLocked removes the queued frames that drop selects, and
// returns those whose Writes fail now. The rest of a split frame stays,
// dropped, until the writer has done with its head (see frame.dropped).
// s.sendMu is held.
func (s *Session) dropQueuedLocked(drop func(*frame) bool) (dropped []frame) {
	kept := s.queue[:0]
	for _, f := range s.queue {
		switch {
		case !drop(&f):
			kept = append(kept, f)
		case f.started:
			f.drop()
			kept = append(kept, f)
		default:
			dropped = append(dropped, f)
		}
	}
	clear(s.queue[len(kept):])
	s.queue = kept
	return dropped
}

// forget removes st from the session's accounting once it is finished.
// st.mu is held.
func (s *Session) forget(st *Stream) {
	st.acceptedLocked()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return // shutdown cleared everything
	}
	if st.state&(stOutbound|stFirstSent) == stOutbound {
		s.unsent--
		s.idsLeft++ // it never took its ID
		return
	}
	if s.streams[st.id] == st {
		delete(s.streams, st.id)
		if st.state&stOutbound == 0 {
			s.inbound--
		}
	}
}
