package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// resetLegacy ends a legacy connection with RST.
func resetLegacy(c netconn.Conn) {
	armReset(c)
	_ = c.Close()
}

// armReset makes the kernel reset a legacy connection, rather than end it
// with a FIN, if the process dies with it open: a proxy killed mid-stream
// must not pass for a clean end of stream to the legacy program on its
// host (a silent truncation). CloseWrite is unaffected; relay disarms it
// before a clean close, which must deliver all the data.
func armReset(c netconn.Conn) { _ = c.SetLinger(0) }

// disarmReset restores a graceful close: Close sends what is still
// buffered, then FIN.
func disarmReset(c netconn.Conn) { _ = c.SetLinger(-1) }

// Copy buffers. A direction holds a buffer only while data is moving: it
// waits for data without one (see reader), so thousands of idle
// connections cost no buffer memory. Small messages use a small buffer;
// a read that fills it, or brings more than a small buffer's worth, moves
// the direction to large buffers (bulk transfer), which cut the number of
// reads, writes and multiplexer frames per byte.
const (
	smallBuf = 4 << 10
	largeBuf = 256 << 10
)

var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}
	largePool = sync.Pool{New: func() any { b := make([]byte, largeBuf); return &b }}
)

// buffer is a direction's current pooled buffer, if any.
type buffer struct {
	p     *[]byte
	large bool // p came from largePool
	// wantLarge says which size the next buffer should be.
	wantLarge bool
}

func (b *buffer) get() []byte {
	if b.p == nil {
		if b.wantLarge {
			b.p, b.large = largePool.Get().(*[]byte), true
		} else {
			b.p, b.large = smallPool.Get().(*[]byte), false
		}
	}
	return *b.p
}

func (b *buffer) release() {
	if b.p == nil {
		return
	}
	if b.large {
		largePool.Put(b.p)
	} else {
		smallPool.Put(b.p)
	}
	b.p = nil
}

// sized records a read of n bytes into a buffer of size: the next buffer is
// large after a read that filled its buffer or exceeded a small one.
func (b *buffer) sized(n, size int) {
	want := n == size || n > smallBuf
	if want != b.large {
		b.release() // the wrong size for what comes next
	}
	b.wantLarge = want
}

// reader reads a direction's source into buffers taken only once data is
// there, and returned when the source is drained.
type reader interface {
	// read reads into b.get() once data can be read (or at EOF or on an
	// error), and returns how many bytes it read.
	read(b *buffer) (int, error)
}

// newReader reads a legacy connection: a kernel socket through its
// RawConn, others (gVisor connections) with Read.
func newReader(src netconn.Conn) reader {
	if rc := rawConn(src); rc != nil {
		return newRawReader(rc)
	}
	return &plainReader{r: src}
}

// rawConn returns c's kernel socket, nil if it has none (a gVisor
// connection).
func rawConn(c netconn.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// rawReader reads a kernel socket with read(2) through its RawConn: a read
// that finds no data gives the buffer back before the poller waits, at no
// extra system call. Deadlines and Close still end the wait.
type rawReader struct {
	rc syscall.RawConn
	fn func(fd uintptr) bool // made once: a closure per read would allocate

	// The current read's buffer and outcome.
	b     *buffer
	n     int
	errno error
}

func newRawReader(rc syscall.RawConn) *rawReader {
	r := &rawReader{rc: rc}
	r.fn = func(fd uintptr) bool {
		for {
			r.n, r.errno = syscall.Read(int(fd), r.b.get())
			switch r.errno {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				r.b.release()
				return false // wait for readability, holding nothing
			}
			return true
		}
	}
	return r
}

func (r *rawReader) read(b *buffer) (int, error) {
	r.b = b
	err := r.rc.Read(r.fn)
	r.b = nil
	switch {
	case err != nil:
		return 0, err
	case r.errno != nil:
		return 0, os.NewSyscallError("read", r.errno)
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

// plainReader holds a buffer while it waits.
type plainReader struct{ r io.Reader }

func (r *plainReader) read(b *buffer) (int, error) { return r.r.Read(b.get()) }

// pipeResult says how one direction of a splice ended.
type pipeResult struct {
	n   int64
	err error  // nil: clean EOF, forwarded as FIN
	op  string // what failed: "read", "write" or "close write"
}

// pipe copies src to dst until EOF (then half-closes dst) or an error. It
// counts bytes into *counter and *activity as they flow, so stats are live
// and an idle timer can tell whether the connection moved.
//
// When dst splices and src is a TCP socket, a burst's first bytes are read
// into a small buffer, as messages are; if they fill it, the rest of the
// burst is spliced into dst, never copied.
//
// Each write or splice into dst is counted in sends while it lasts, so
// that a reset of src that comes while it waits is seen (see
// checkStalledSends).
func pipe(dst channels.Stream, src netconn.Conn, counter, activity *atomic.Int64, sends *sendWatch) pipeResult {
	var b buffer
	defer b.release()
	rd := newReader(src)
	cw := countingWriter{w: dst, counter: counter, activity: activity}
	var sp channels.Stream // set while splicing pays: src is a kernel socket
	if tc, ok := src.(*net.TCPConn); ok {
		cw.sock, sp = tc, dst
	}
	var total int64
	for {
		nr, rerr := rd.read(&b)
		op := "read"
		if nr > 0 {
			buf := *b.p
			sends.begin()
			nw, werr := cw.Write(buf[:nr])
			sends.end()
			total += int64(nw)
			if werr != nil {
				return pipeResult{total, werr, "write"}
			}
			if sp != nil && rerr == nil && nr == len(buf) {
				var n int64
				sends.begin()
				n, rerr = sp.SpliceFrom(&cw)
				sends.end()
				total += n
				if errors.Is(rerr, channels.ErrNoSplice) {
					sp, rerr = nil, nil
				}
				op = "splice"
			}
			if sp == nil {
				b.sized(nr, len(buf))
			}
		}
		if rerr != nil {
			if rerr == io.EOF { // exactly EOF: a stream reset by a dying session wraps io.EOF
				return pipeResult{total, dst.CloseWrite(), "close write"}
			}
			return pipeResult{total, rerr, op}
		}
	}
}

// pipeFrom copies a stream to a legacy connection like pipe, with the
// stream handing its received buffers to the writer itself (WriteTo): one
// copy per byte fewer, and no buffer held while idle.
func pipeFrom(dst netconn.Conn, src channels.Stream, counter, activity *atomic.Int64) pipeResult {
	cw := countingWriter{w: dst, counter: counter, activity: activity}
	if tc, ok := dst.(*net.TCPConn); ok {
		cw.sock = tc // a mux stream may splice to it
	}
	n, err := src.WriteTo(&cw)
	switch {
	case cw.err != nil:
		return pipeResult{n, cw.err, "write"}
	case err != nil:
		return pipeResult{n, err, "read"}
	}
	// WriteTo returns nil only at the stream's FIN.
	return pipeResult{n, dst.CloseWrite(), "close write"}
}

// countingWriter counts the bytes written through it into counter and
// activity as they flow (so stats are live and the idle timer sees
// movement), turns a short write into io.ErrShortWrite, and keeps the
// write error so that pipeFrom can tell it from the source's.
//
// With sock, the legacy TCP socket of the direction, it is also a
// channels.SpliceConn: a stream may splice data from sock (pipe) or to it
// (pipeFrom), and reports those bytes to Spliced.
type countingWriter struct {
	w                 io.Writer
	counter, activity *atomic.Int64
	err               error
	sock              *net.TCPConn
}

var errNoSocket = errors.New("no socket to splice")

// SyscallConn returns sock's RawConn.
func (c *countingWriter) SyscallConn() (syscall.RawConn, error) {
	if c.sock == nil {
		return nil, errNoSocket
	}
	return c.sock.SyscallConn()
}

// Spliced counts n bytes moved by splice(2); Write counts what it writes
// through it too.
func (c *countingWriter) Spliced(n int) {
	c.counter.Add(int64(n))
	c.activity.Add(int64(n))
}

// SetWriteDeadline sets w's write deadline: a stream's WriteTo cuts a
// write to a legacy program that does not read short this way when the
// stream is reset or its session ends.
func (c *countingWriter) SetWriteDeadline(t time.Time) error {
	if d, ok := c.w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		return d.SetWriteDeadline(t)
	}
	return nil
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.Spliced(n)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		c.err = err
	}
	return n, err
}

// relayStats receives live byte counts of a relay.
type relayStats struct {
	legacyToStream *atomic.Int64
	streamToLegacy *atomic.Int64
	both           *atomic.Int64 // this connection's bytes, either way
	sends          *sendWatch    // the sends legacy to stream
}

// relay joins a legacy TCP connection and a stream with TCP semantics in
// both directions, copying or, where both ends are kernel sockets, splicing
// (splice(2)) each way: EOF on one side becomes FIN (CloseWrite) on the other
// while the reverse direction keeps flowing; any other error on either side
// (RST, stream reset, transport loss) resets both. It returns when both
// directions have ended and both connections are closed. Back-pressure is
// end to end: each direction reads only after the previous write finished.
// The result's err is nil after two clean EOFs.
func relay(legacy netconn.Conn, stream channels.Stream, st relayStats) relayResult {
	var (
		abortOnce sync.Once
		wg        sync.WaitGroup
		up        pipeResult
		watch     halfCloseWatch
		failed    atomic.Bool
	)
	fail := func() {
		abortOnce.Do(func() {
			failed.Store(true)
			_ = stream.Reset()
			resetLegacy(legacy)
		})
	}
	// A direction that ends with EOF waits, while the other goes on, for
	// its source to be reset, and then fails: a legacy program that
	// half-closed and then aborts, or a far end that does, must reset the
	// other side at once, as it would without the proxy; that side may be
	// waiting only to read, and would otherwise learn of the reset at its
	// next write, or never.
	wg.Add(1)
	go func() {
		defer wg.Done()
		up = pipe(stream, legacy, st.legacyToStream, st.both, st.sends)
		if up.err == nil && watch.ended(stream) {
			if err := awaitLegacyReset(legacy); err != nil {
				up.err, up.op = err, "read"
			}
		}
		if up.err != nil {
			fail()
		}
	}()
	down := pipeFrom(legacy, stream, st.streamToLegacy, st.both)
	if down.err == nil && watch.ended(legacy) {
		// Not when the wait ends because fail reset the stream: the
		// direction itself ended with FIN.
		if err := stream.AwaitReset(); err != nil && !failed.Load() {
			down.err, down.op = err, "read"
		}
	}
	if down.err != nil {
		fail()
	}
	wg.Wait()
	if up.err == nil && down.err == nil {
		disarmReset(legacy)
	}
	_ = legacy.Close()
	_ = stream.Close()
	return relayResult{up: up, down: down}
}

// halfCloseWatch coordinates the two directions of a splice once they
// end cleanly: the first to end waits for its source's reset, and the
// second ends that wait.
type halfCloseWatch struct {
	mu       sync.Mutex
	oneEnded bool // a direction ended cleanly, and waits
}

// ended records a direction's clean end, and reports whether it is the
// first, which then waits for its source's reset while the other goes on.
// The second ends that wait with a past read deadline on the first one's
// source, otherSrc.
func (w *halfCloseWatch) ended(otherSrc net.Conn) bool {
	w.mu.Lock()
	first := !w.oneEnded
	w.oneEnded = true
	w.mu.Unlock()
	if !first {
		_ = otherSrc.SetReadDeadline(aLongTimeAgo)
	}
	return first
}

// aLongTimeAgo is a deadline in the past: it ends a wait at once.
var aLongTimeAgo = time.Unix(1, 0)

// awaitLegacyReset waits, after c's EOF, until c is reset, and returns the
// reset as a read error; it returns nil when c is closed or its read
// deadline passes first. A netconn.ResetAwaiter (a gVisor connection)
// waits with AwaitReset. A kernel socket waits on the poller: after EOF it
// reports readiness again only when the socket's state changes, so the
// wait costs no system calls, and SO_ERROR tells a reset from other
// changes. Other connections return nil at once: their reset after a
// half-close is passed on at the next write or close.
func awaitLegacyReset(c netconn.Conn) error {
	if r, ok := c.(netconn.ResetAwaiter); ok {
		return r.AwaitReset()
	}
	rc := rawConn(c)
	if rc == nil {
		return nil
	}
	var reset error
	err := rc.Read(func(fd uintptr) bool {
		n, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err == nil && n != 0 {
			reset = os.NewSyscallError("read", syscall.Errno(n))
			return true
		}
		return false // no error: wait for the socket's next change
	})
	if err != nil {
		return nil // closed, or the deadline ended the watch
	}
	return reset
}

// relayResult says how both directions of a relay ended: up is legacy
// to stream, down stream to legacy.
type relayResult struct{ up, down pipeResult }

// err is nil when both directions ended with a clean EOF.
func (r relayResult) err() error { return errors.Join(r.up.err, r.down.err) }

// outcome names how a direction ended, for logs.
func (r pipeResult) outcome() string {
	if r.err == nil {
		return "fin"
	}
	return r.op + ": " + r.err.Error()
}
