package channels

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/mux"
)

// stream adapts a mux stream to Stream: it translates the multiplexer's
// errors into this package's (ErrStreamReset, os.ErrDeadlineExceeded,
// net.ErrClosed) and calls release exactly once, when the stream is
// finished in both directions, so that balancer counts stay exact.
type stream struct {
	ys *mux.Stream

	// readDone and writeDone record each direction's end; closed records a
	// local Close, after which our own calls report net.ErrClosed.
	readDone, writeDone, closed atomic.Bool

	releaseOnce sync.Once
	release     func() // never nil
}

func newStream(ys *mux.Stream, release func()) *stream {
	if release == nil {
		release = func() {}
	}
	return &stream{ys: ys, release: release}
}

var _ Stream = (*stream)(nil)

func (s *stream) finish() { s.releaseOnce.Do(s.release) }

// maybeFinish releases the stream once both directions have ended.
func (s *stream) maybeFinish() {
	if s.readDone.Load() && s.writeDone.Load() {
		s.finish()
	}
}

// readEnded records the peer's FIN, read to the end.
func (s *stream) readEnded() {
	s.readDone.Store(true)
	s.maybeFinish()
}

func (s *stream) Read(b []byte) (int, error) {
	n, err := s.ys.Read(b)
	if err == nil {
		return n, nil
	}
	if err == io.EOF {
		s.readEnded()
		return n, io.EOF
	}
	return n, s.mapErr("read", err)
}

func (s *stream) Write(b []byte) (int, error) {
	n, err := s.ys.Write(b)
	if err != nil {
		return n, s.mapErr("write", err)
	}
	return n, nil
}

// WriteTo writes what arrives to w, handing the multiplexer's buffers to w
// without a copy, until the peer's FIN (nil) or an error: w's own, or one
// that ends the stream, mapped as by Read.
func (s *stream) WriteTo(w io.Writer) (int64, error) {
	n, err := s.ys.WriteTo(w)
	if err == nil {
		s.readEnded()
		return n, nil
	}
	if errors.Is(err, mux.ErrStreamReset) || errors.Is(err, os.ErrDeadlineExceeded) || s.closed.Load() {
		return n, s.mapErr("read", err)
	}
	return n, err // w's error
}

// SpliceFrom moves what src has to read into the stream with splice(2);
// see mux.Stream.SpliceFrom. The multiplexer's ErrNoSplice becomes this
// package's, the stream's errors are mapped as by Write, and src's are
// returned as they are.
func (s *stream) SpliceFrom(src SpliceConn) (int64, error) {
	n, err := s.ys.SpliceFrom(src)
	switch {
	case err == nil:
	case errors.Is(err, mux.ErrNoSplice):
		return n, ErrNoSplice
	case s.closed.Load() || errors.Is(err, mux.ErrStreamReset) || errors.Is(err, mux.ErrWriteAfterClose):
		return n, s.mapErr("write", err)
	}
	return n, err
}

// AwaitReset waits until the stream is reset (returning an error that
// matches ErrStreamReset) or until its write side ends cleanly, it is
// closed or its read deadline passes (nil); see mux.Stream.AwaitReset.
func (s *stream) AwaitReset() error {
	if err := s.ys.AwaitReset(); err != nil {
		return s.mapErr("write", err)
	}
	return nil
}

// CloseWrite sends FIN: the peer reads io.EOF after the data written so far.
func (s *stream) CloseWrite() error {
	err := s.ys.CloseWrite()
	s.writeDone.Store(true)
	s.maybeFinish()
	if err != nil {
		return s.mapErr("close write", err)
	}
	return nil
}

// Close closes both directions: FIN to the peer, and data still arriving is
// discarded.
func (s *stream) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	err := s.ys.Close()
	s.finish()
	return err
}

// Reset aborts both directions and sends RST to the peer.
func (s *stream) Reset() error {
	err := s.ys.Reset()
	s.finish()
	return err
}

func (s *stream) LocalAddr() net.Addr                { return s.ys.LocalAddr() }
func (s *stream) RemoteAddr() net.Addr               { return s.ys.RemoteAddr() }
func (s *stream) SetDeadline(t time.Time) error      { return s.ys.SetDeadline(t) }
func (s *stream) SetReadDeadline(t time.Time) error  { return s.ys.SetReadDeadline(t) }
func (s *stream) SetWriteDeadline(t time.Time) error { return s.ys.SetWriteDeadline(t) }

// mapErr translates a multiplexer error of a Read or Write.
func (s *stream) mapErr(op string, err error) error {
	switch {
	case s.closed.Load():
		return &net.OpError{Op: op, Net: "stream", Err: net.ErrClosed}
	case errors.Is(err, os.ErrDeadlineExceeded):
		return &net.OpError{Op: op, Net: "stream", Err: os.ErrDeadlineExceeded}
	case errors.Is(err, mux.ErrWriteAfterClose):
		// Only Write can see this: the stream was half-closed by CloseWrite.
		return &net.OpError{Op: op, Net: "stream", Err: fmt.Errorf("after CloseWrite: %w", net.ErrClosed)}
	case errors.Is(err, mux.ErrStreamReset):
		// A peer's RST, our own Reset, or the session's end: the stream is
		// over.
		s.finish()
		return &resetError{cause: err}
	default:
		return fmt.Errorf("stream %s: %w", op, err)
	}
}

// resetError matches ErrStreamReset and names the multiplexer's cause
// (remote RST, local reset, or the session's end) for logs. Like the
// multiplexer's own, it does not unwrap: a reset must never pass for a
// clean end of stream (errors.Is(err, io.EOF)), or a truncated stream
// would be forwarded as a FIN.
type resetError struct{ cause error }

func (e *resetError) Error() string        { return e.cause.Error() }
func (e *resetError) Is(target error) bool { return target == ErrStreamReset }
