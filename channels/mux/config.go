package mux

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Config tunes a Session. The zero value is valid: every zero field takes
// its default.
type Config struct {
	// KeepAliveInterval is the period of pings; 0 disables keepalive (a ping
	// is still sent now and then to measure the round-trip time that window
	// auto-tuning needs). A ping unanswered for KeepAliveTimeout (default
	// 10s) ends the session if nothing at all arrived meanwhile and the
	// peer took nothing we sent: any byte received, and any byte of ours
	// the peer acknowledges, count as liveness, so that a ping or pong
	// queued behind bulk data on a slow link does not kill a busy session.
	KeepAliveInterval, KeepAliveTimeout time.Duration

	// MaxStreamWindow is the largest receive window per stream (at least
	// 256 KiB, the protocol's initial window; default 16 MiB). Windows start
	// at 256 KiB and double, up to this maximum, when the reader drains a
	// window in less than about four round trips, so idle or slow streams
	// never pin large windows.
	MaxStreamWindow uint32

	// MaxFrame is the largest data payload per frame (default 256 KiB):
	// larger frames cost fewer headers and system calls. It does not bound
	// how long one stream's data holds up another's: a small message (or
	// a FIN, a window update) goes out with the writer's next batch, ahead
	// of large frames queued before it, and a larger one with one of the
	// next, as the busy streams take turns; but each waits for the batch
	// being written, which holds about 512 KiB of large frames (at least
	// one; 50 ms of a slower link's rate), and for what the connection's
	// send buffer holds.
	MaxFrame uint32

	// MaxBuffered bounds the received data a session holds that nothing
	// has read yet, over all its streams (default 256 MiB, at least
	// 1 MiB). A data frame that would take it past the bound resets its
	// stream (LimitStats.RefusedMemory); other streams carry on. Windows
	// stop growing while the session holds more than a quarter of it, and
	// grow by at most a quarter of it in all, so a peer keeping to its
	// windows reaches it only with more than about 3/4 MaxBuffered /
	// 256 KiB streams (the protocol's initial window) that nothing reads.
	// Keep it well above the peer's MaxPendingOpens times 256 KiB: streams
	// not yet accepted may each hold their initial window.
	MaxBuffered int64

	// MaxIncomingStreams bounds the open streams the peer opened (default
	// 65536); beyond it, new inbound streams are reset.
	MaxIncomingStreams int

	// AcceptBacklog bounds the inbound streams waiting for AcceptStream
	// (default 1024); beyond it, new inbound streams are reset.
	AcceptBacklog int

	// MaxPendingOpens bounds the streams this side opened that the peer
	// has not accepted yet (default 256): OpenStream waits beyond it,
	// until its context is done, so that a burst of opens waits for the
	// peer rather than overflowing the peer's AcceptBacklog and being
	// reset. The peer accepts a stream when its AcceptStream returns it,
	// and says so at once with the stream's first frame (ACK). A stream
	// holds its place until then, or until it ends. Keep it at most the
	// peer's AcceptBacklog.
	MaxPendingOpens int

	// WriteTimeout bounds each write to the connection (default 10s): a
	// peer that stops reading for that long ends the session. A write
	// over TCP that waits because the kernel is retransmitting (a link
	// that dropped packets or went down for a moment, whose
	// retransmission timer has backed off) waits on, up to twice
	// WriteTimeout or the keepalive's bound, whichever is longer, since
	// its last progress (LimitStats.LossWaits counts the extensions;
	// Stalled says how long a write has waited).
	WriteTimeout time.Duration

	// NoSplice turns off zero-copy splicing (see Stream.SpliceFrom and
	// WriteTo): data is then always copied through the process. Sessions
	// over anything but a TCP or Unix stream socket never splice.
	NoSplice bool

	// Logger receives the session's rare events (protocol errors, refused
	// streams, keepalive failures); nil means slog.Default().
	Logger *slog.Logger
}

// Defaults.
const (
	DefaultKeepAliveTimeout   = 10 * time.Second
	DefaultMaxStreamWindow    = 16 << 20
	DefaultMaxFrame           = 256 << 10
	DefaultMaxIncomingStreams = 1 << 16
	DefaultMaxBuffered        = 256 << 20
	DefaultAcceptBacklog      = 1024
	DefaultMaxPendingOpens    = 256
	DefaultWriteTimeout       = 10 * time.Second

	// minMaxBuffered leaves room for a few streams' initial windows.
	minMaxBuffered = 4 * initialWindow
	// minMaxFrame keeps the header overhead per byte small.
	minMaxFrame = 1 << 10
	// rttInterval is how often the round-trip time is measured when
	// keepalive is off.
	rttInterval = 30 * time.Second
)

// withDefaults validates c and fills in its defaults. The error names every
// bad field.
func (c Config) withDefaults() (Config, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.KeepAliveInterval < 0 {
		bad("KeepAliveInterval %v is negative", c.KeepAliveInterval)
	}
	if c.KeepAliveTimeout < 0 {
		bad("KeepAliveTimeout %v is negative", c.KeepAliveTimeout)
	}
	if c.WriteTimeout < 0 {
		bad("WriteTimeout %v is negative", c.WriteTimeout)
	}
	if c.MaxStreamWindow != 0 && c.MaxStreamWindow < initialWindow {
		bad("MaxStreamWindow %d is below the protocol's initial window %d", c.MaxStreamWindow, initialWindow)
	}
	if c.MaxFrame != 0 && c.MaxFrame < minMaxFrame {
		bad("MaxFrame %d is below %d", c.MaxFrame, minMaxFrame)
	}
	if c.MaxBuffered != 0 && c.MaxBuffered < minMaxBuffered {
		bad("MaxBuffered %d is below %d", c.MaxBuffered, minMaxBuffered)
	}
	if c.MaxIncomingStreams < 0 {
		bad("MaxIncomingStreams %d is negative", c.MaxIncomingStreams)
	}
	if c.AcceptBacklog < 0 {
		bad("AcceptBacklog %d is negative", c.AcceptBacklog)
	}
	if c.MaxPendingOpens < 0 {
		bad("MaxPendingOpens %d is negative", c.MaxPendingOpens)
	}
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("mux config: %w", err)
	}
	if c.KeepAliveTimeout == 0 {
		c.KeepAliveTimeout = DefaultKeepAliveTimeout
	}
	if c.MaxStreamWindow == 0 {
		c.MaxStreamWindow = DefaultMaxStreamWindow
	}
	if c.MaxFrame == 0 {
		c.MaxFrame = DefaultMaxFrame
	}
	if c.MaxBuffered == 0 {
		c.MaxBuffered = DefaultMaxBuffered
	}
	if c.MaxIncomingStreams == 0 {
		c.MaxIncomingStreams = DefaultMaxIncomingStreams
	}
	if c.AcceptBacklog == 0 {
		c.AcceptBacklog = DefaultAcceptBacklog
	}
	if c.MaxPendingOpens == 0 {
		c.MaxPendingOpens = DefaultMaxPendingOpens
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}
