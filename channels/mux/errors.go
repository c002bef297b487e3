package mux

import (
	"errors"
	"fmt"
	"net"
	"os"
)

var (
	// ErrStreamReset is matched (errors.Is) by every error that ends a
	// stream other than its clean end: a reset by either side, or the end
	// of the session. Such errors never match io.EOF.
	ErrStreamReset = errors.New("mux: stream reset")

	// ErrSessionClosed is matched by the errors of session operations after
	// the session ended, and by stream errors caused by the session's end.
	ErrSessionClosed = errors.New("mux: session closed")

	// ErrWriteAfterClose is returned by Write after CloseWrite or Close. It
	// matches net.ErrClosed.
	ErrWriteAfterClose = fmt.Errorf("mux: write after close: %w", net.ErrClosed)

	// ErrProtocol is matched by Session.Err when the peer broke the
	// protocol (the session then sent GoAway with the protocol error code).
	ErrProtocol = errors.New("mux: protocol error")

	// ErrKeepAliveTimeout is matched by Session.Err when the peer stopped
	// answering pings.
	ErrKeepAliveTimeout = errors.New("mux: keepalive timeout")

	// ErrRemoteGoAway is matched by Session.Err when the peer ended the
	// session with GoAway.
	ErrRemoteGoAway = errors.New("mux: peer sent GoAway")

	// errReadAfterClose is returned by Read and WriteTo after Close.
	errReadAfterClose = fmt.Errorf("mux: read after close: %w", net.ErrClosed)
)

// resetError ends a stream that did not end cleanly. It deliberately has no
// Unwrap: the session's cause may be a connection's io.EOF, and a reset
// must never pass for a clean end of stream (errors.Is(err, io.EOF)), or a
// truncated stream would be forwarded as complete. The cause is in the
// message only.
type resetError struct {
	remote  bool   // the peer sent RST
	session error  // non-nil: the session ended with this cause
	why     string // a local reset's reason, if not the application's
}

var (
	errRemoteReset = &resetError{remote: true}
	errLocalReset  = &resetError{}
	errMemoryReset = &resetError{why: "the session holds its limit of unread data (MaxBuffered)"}
)

func (e *resetError) Error() string {
	switch {
	case e.session != nil:
		return "mux: stream reset: session ended: " + e.session.Error()
	case e.remote:
		return "mux: stream reset by peer"
	case e.why != "":
		return "mux: stream reset locally: " + e.why
	default:
		return "mux: stream reset locally"
	}
}

func (e *resetError) Is(target error) bool {
	return target == ErrStreamReset || (e.session != nil && target == ErrSessionClosed)
}

// timeoutError is returned by stream operations past their deadline.
func timeoutError(op string) error {
	return &net.OpError{Op: op, Net: "mux", Err: os.ErrDeadlineExceeded}
}
