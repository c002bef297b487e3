package netstack

import (
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Conn is a TCP connection in a gVisor stack. On top of gonet.TCPConn it
// adds what the proxy needs from a *net.TCPConn: SetLinger (SetLinger(0)
// then Close sends RST), net.ErrClosed after Close, os.ErrDeadlineExceeded
// on deadlines, and errors that match syscall errnos with errors.Is.
type Conn struct {
	tc     *gonet.TCPConn
	ep     tcpip.Endpoint
	wq     *waiter.Queue
	closed atomic.Bool

	// For AwaitReset, which gonet's deadlines cannot wake: the read
	// deadline (Unix nanoseconds, 0 for none), and, made by the first
	// AwaitReset (idle connections do without), a wake-up on each new read
	// deadline and on Close.
	readDeadline atomic.Int64
	kick         atomic.Pointer[chan struct{}]
}

var _ net.Conn = (*Conn)(nil)

func newConn(wq *waiter.Queue, ep tcpip.Endpoint) *Conn {
	return &Conn{tc: gonet.NewTCPConn(wq, ep), ep: ep, wq: wq}
}

// Read implements net.Conn. It returns io.EOF once the peer has half-closed
// and everything it sent has been read.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.tc.Read(b)
	return n, c.fixErr("read", err)
}

// Write implements net.Conn.
func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.tc.Write(b)
	return n, c.fixErr("write", err)
}

// Close implements net.Conn: it sends FIN, or RST after SetLinger(0).
// Pending Read and Write calls return net.ErrClosed.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return c.opError("close", net.ErrClosed)
	}
	c.wake()
	return c.tc.Close()
}

// AwaitReset waits until the connection is reset by the peer (or fails
// otherwise, such as by a retransmission timeout) and returns the error a
// read would then see. It returns nil when the connection is closed here
// or its read deadline passes. The proxy calls it once the peer has
// half-closed, when a read returns only EOF whatever comes next. One
// AwaitReset at a time: a second one may miss its wake-up.
func (c *Conn) AwaitReset() error {
	// The wake-up exists before the checks below: a Close or a deadline
	// that comes after them finds it.
	kick := c.kick.Load()
	if kick == nil {
		k := make(chan struct{}, 1)
		c.kick.CompareAndSwap(nil, &k)
		kick = c.kick.Load()
	}
	e, ch := waiter.NewChannelEntry(waiter.EventErr | waiter.EventHUp)
	c.wq.EventRegister(&e)
	defer c.wq.EventUnregister(&e)
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		if c.closed.Load() {
			return nil
		}
		if s := tcp.EndpointState(c.ep.State()); s == tcp.StateError || s == tcp.StateClose {
			// An RST in CLOSE-WAIT ends in CLOSED, as in Linux; so does a
			// clean close (our FIN acknowledged), which has no error, or
			// only a soft one (an ICMP error the connection outlived).
			errno := syscall.ECONNABORTED
			switch c.ep.LastError().(type) {
			case *tcpip.ErrAborted:
				errno = syscall.EPIPE // an RST in CLOSE-WAIT, as Linux reports it
			case *tcpip.ErrConnectionReset:
				errno = syscall.ECONNRESET
			case *tcpip.ErrTimeout:
				errno = syscall.ETIMEDOUT
			default:
				if s == tcp.StateClose {
					return nil
				}
			}
			return c.opError("read", os.NewSyscallError("read", errno))
		}
		var expire <-chan time.Time
		if dl := c.readDeadline.Load(); dl != 0 {
			d := time.Until(time.Unix(0, dl))
			if d <= 0 {
				return nil
			}
			if timer == nil {
				timer = time.NewTimer(d)
			} else {
				timer.Reset(d)
			}
			expire = timer.C
		}
		select {
		case <-ch:
		case <-*kick:
		case <-expire:
		}
	}
}

// wake makes a waiting AwaitReset look at the connection again; the
// caller has changed what it looks at first.
func (c *Conn) wake() {
	if kick := c.kick.Load(); kick != nil {
		select {
		case *kick <- struct{}{}:
		default:
		}
	}
}

func (c *Conn) setReadDeadline(t time.Time) {
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	c.readDeadline.Store(ns)
	c.wake()
}

// CloseWrite half-closes the connection: the peer reads io.EOF after the
// data already written, and this side can still Read.
func (c *Conn) CloseWrite() error {
	return c.fixErr("close", c.tc.CloseWrite())
}

// CloseRead shuts down the reading side.
func (c *Conn) CloseRead() error {
	return c.fixErr("close", c.tc.CloseRead())
}

// SetLinger sets SO_LINGER as *net.TCPConn does: sec < 0 restores the
// default (Close sends FIN); sec == 0 makes Close abort the connection with
// RST, discarding unsent data; sec > 0 is accepted but Close never blocks
// (gVisor sends FIN and keeps draining in the background).
func (c *Conn) SetLinger(sec int) error {
	c.ep.SocketOptions().SetLinger(tcpip.LingerOption{
		Enabled: sec >= 0,
		Timeout: time.Duration(max(sec, 0)) * time.Second,
	})
	return nil
}

// LocalAddr implements net.Conn; the address is a *net.TCPAddr.
func (c *Conn) LocalAddr() net.Addr { return c.tc.LocalAddr() }

// RemoteAddr implements net.Conn; the address is a *net.TCPAddr.
func (c *Conn) RemoteAddr() net.Addr { return c.tc.RemoteAddr() }

// SetDeadline implements net.Conn.
func (c *Conn) SetDeadline(t time.Time) error {
	c.setReadDeadline(t)
	return c.tc.SetDeadline(t)
}

// SetReadDeadline implements net.Conn; it also bounds AwaitReset.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.setReadDeadline(t)
	return c.tc.SetReadDeadline(t)
}

// SetWriteDeadline implements net.Conn.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.tc.SetWriteDeadline(t) }

// abort resets the connection; used for connections nobody accepted.
func (c *Conn) abort() {
	c.closed.Store(true)
	c.wake()
	c.ep.Abort()
}

// fixErr rewrites gonet's errors into what a *net.TCPConn would return.
func (c *Conn) fixErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if c.closed.Load() {
		// gonet reports its own Close as io.EOF or "aborted".
		return c.opError(op, net.ErrClosed)
	}
	if errors.Is(err, io.EOF) {
		return err
	}
	var oe *net.OpError
	if !errors.As(err, &oe) {
		return err
	}
	var timeout interface{ Timeout() bool }
	switch {
	case errors.As(oe.Err, &timeout) && timeout.Timeout():
		oe.Err = os.ErrDeadlineExceeded
	default:
		if errno, ok := errnoByMessage[oe.Err.Error()]; ok {
			oe.Err = os.NewSyscallError(op, errno)
		}
	}
	return oe
}

func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// PeerReset reports whether the peer has reset the connection (or it
// failed otherwise, such as by a retransmission timeout), without reading
// it and without consuming the error, which a read returns next: the proxy
// asks while data read from the connection waits to be sent on, and it
// does not read. An RST after the peer's FIN (in CLOSE-WAIT) leaves the
// endpoint closed as a clean close does, and only consuming its error
// would tell them apart: that one is seen at the next read.
func (c *Conn) PeerReset() bool {
	return !c.closed.Load() && tcp.EndpointState(c.ep.State()) == tcp.StateError
}
