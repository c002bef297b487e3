package channels

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// MemoryTransport is an in-process Transport: Listen registers a listener
// under an address string and Dial connects to it through an in-memory
// pipe that buffers each direction up to a bound, as a socket does (so
// TLS 1.3, whose two sides may write at once, works over it), so tests
// run the real handshake and multiplexer hermetically. The zero value
// is not usable; call NewMemoryTransport. Nodes that should reach each
// other must share one MemoryTransport.
type MemoryTransport struct {
	mu        sync.Mutex
	listeners map[string]*memListener
	nextPort  int
	nextConn  int // ephemeral ports of connections made through From
}

// NewMemoryTransport returns an empty in-process transport.
func NewMemoryTransport() *MemoryTransport {
	return &MemoryTransport{listeners: make(map[string]*memListener), nextPort: 1}
}

// Listen registers a listener at addr. A port of 0 ("host:0") is replaced by
// a free one; an address in use is an error.
func (t *MemoryTransport) Listen(addr string) (net.Listener, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if host, port, err := net.SplitHostPort(addr); err == nil && port == "0" {
		for {
			addr = net.JoinHostPort(host, strconv.Itoa(t.nextPort))
			t.nextPort++
			if _, used := t.listeners[addr]; !used {
				break
			}
		}
	}
	if _, used := t.listeners[addr]; used {
		return nil, &net.OpError{Op: "listen", Net: "memory", Addr: memAddr(addr), Err: syscall.EADDRINUSE}
	}
	l := &memListener{t: t, addr: memAddr(addr), conns: make(chan net.Conn), done: make(chan struct{})}
	t.listeners[addr] = l
	return l, nil
}

// Dial connects to the listener at addr, or fails with "connection refused"
// when there is none.
func (t *MemoryTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	return t.dial(ctx, addr, nil)
}

// From returns a view of t for a node on a host with address ip: the
// connections it dials appear to the listener to come from ip (a
// *net.TCPAddr with an ephemeral port), and to the dialer to go to the
// listener's address as a *net.TCPAddr when that is an ip:port. Tests
// place nodes on distinct hosts with it, without a network.
func (t *MemoryTransport) From(ip netip.Addr) Transport { return memHost{t: t, ip: ip} }

type memHost struct {
	t  *MemoryTransport
	ip netip.Addr
}

func (h memHost) Listen(addr string) (net.Listener, error) { return h.t.Listen(addr) }

func (h memHost) Dial(ctx context.Context, addr string) (net.Conn, error) {
	return h.t.dial(ctx, addr, &h.ip)
}

func (t *MemoryTransport) dial(ctx context.Context, addr string, from *netip.Addr) (net.Conn, error) {
	t.mu.Lock()
	l := t.listeners[addr]
	t.mu.Unlock()
	refused := &net.OpError{Op: "dial", Net: "memory", Addr: memAddr(addr), Err: syscall.ECONNREFUSED}
	if l == nil {
		return nil, refused
	}
	client, server := memPipe(memPipeBuffer)
	var local, remote net.Addr = memAddr(fmt.Sprintf("memory-client-%p", client)), l.addr
	if from != nil {
		t.mu.Lock()
		t.nextConn++
		port := 32768 + t.nextConn%28232
		t.mu.Unlock()
		local = net.TCPAddrFromAddrPort(netip.AddrPortFrom(*from, uint16(port)))
		if ap, err := netip.ParseAddrPort(addr); err == nil {
			remote = net.TCPAddrFromAddrPort(ap)
		}
	}
	select {
	case l.conns <- server.withAddrs(l.addr, local):
		return client.withAddrs(local, remote), nil
	case <-l.done:
		client.Close()
		server.Close()
		return nil, refused
	case <-ctx.Done():
		client.Close()
		server.Close()
		return nil, &net.OpError{Op: "dial", Net: "memory", Addr: memAddr(addr), Err: ctx.Err()}
	}
}

type memListener struct {
	t     *MemoryTransport
	addr  memAddr
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "memory", Addr: l.addr, Err: net.ErrClosed}
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() {
		l.t.mu.Lock()
		delete(l.t.listeners, string(l.addr))
		l.t.mu.Unlock()
		close(l.done)
	})
	return nil
}

func (l *memListener) Addr() net.Addr { return l.addr }

type memAddr string

func (memAddr) Network() string  { return "memory" }
func (a memAddr) String() string { return string(a) }

// memPipeBuffer is how many bytes each direction of a MemoryTransport
// connection holds before its writer blocks: about a loopback socket's
// buffer, and enough for a TLS handshake's flights.
const memPipeBuffer = 64 << 10

// memPipe returns the two ends of an in-memory connection. Unlike
// net.Pipe, a Write returns once its bytes are buffered (up to size bytes
// per direction), not when the peer has read them, so both ends may write
// at once, as on a socket.
func memPipe(size int) (*memConn, *memConn) {
	ab, ba := newMemBuffer(size), newMemBuffer(size)
	a := &memConn{rx: ba, tx: ab, done: make(chan struct{})}
	b := &memConn{rx: ab, tx: ba, done: make(chan struct{})}
	return a, b
}

// memConn is one end of a memPipe: it reads from rx and writes to tx.
// Closing it ends both: the peer reads what was buffered and then io.EOF,
// and its writes fail.
type memConn struct {
	rx, tx        *memBuffer
	local, remote net.Addr
	// wmu makes each Write contiguous in the stream, as on a socket.
	wmu       sync.Mutex
	rdl, wdl  memDeadline
	done      chan struct{} // closed by Close
	closeOnce sync.Once
}

func (c *memConn) withAddrs(local, remote net.Addr) *memConn {
	c.local, c.remote = local, remote
	return c
}

func (c *memConn) LocalAddr() net.Addr  { return c.local }
func (c *memConn) RemoteAddr() net.Addr { return c.remote }

func (c *memConn) opError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	return &net.OpError{Op: op, Net: "memory", Source: c.local, Addr: c.remote, Err: err}
}

func (c *memConn) Read(p []byte) (int, error) {
	n, err := c.rx.read(p, &c.rdl, c.done)
	return n, c.opError("read", err)
}

func (c *memConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	n, err := c.tx.write(p, &c.wdl, c.done)
	return n, c.opError("write", err)
}

func (c *memConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.done)
		c.tx.closeWriter()
		c.rx.closeReader()
	})
	return nil
}

func (c *memConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

func (c *memConn) SetReadDeadline(t time.Time) error { return c.setDeadline(&c.rdl, t) }

func (c *memConn) SetWriteDeadline(t time.Time) error { return c.setDeadline(&c.wdl, t) }

func (c *memConn) setDeadline(d *memDeadline, t time.Time) error {
	select {
	case <-c.done:
		return c.opError("set deadline", net.ErrClosed)
	default:
	}
	d.set(t)
	return nil
}

// memBuffer is one direction of a memPipe: a ring of at most size bytes
// that the writing end fills and the reading end drains.
type memBuffer struct {
	mu          sync.Mutex
	ring        []byte // allocated by the first write
	size        int
	start, n    int           // unread bytes: n from ring[start], wrapping
	changed     chan struct{} // closed when bytes, room or the ends change, if waited on
	waited      bool          // someone waits on changed
	writeClosed bool          // the reader sees io.EOF once the buffer is empty
	readClosed  bool          // writes fail; buffered bytes were dropped
}

func newMemBuffer(size int) *memBuffer {
	return &memBuffer{size: size, changed: make(chan struct{})}
}

// waitUnlock unlocks b and waits for its next change, the deadline d or
// done, whichever comes first; the caller looks again.
func (b *memBuffer) waitUnlock(d *memDeadline, done <-chan struct{}) {
	b.waited = true
	changed := b.changed
	b.mu.Unlock()
	select {
	case <-changed:
	case <-d.expired():
	case <-done:
	}
}

// wakeLocked wakes every waiter.
func (b *memBuffer) wakeLocked() {
	if b.waited {
		close(b.changed)
		b.changed = make(chan struct{})
		b.waited = false
	}
}

// memReady reports why an operation cannot proceed before it looks at the
// buffer: its end is closed, or its deadline has passed.
func memReady(d *memDeadline, done <-chan struct{}) error {
	select {
	case <-done:
		return net.ErrClosed
	default:
	}
	select {
	case <-d.expired():
		return os.ErrDeadlineExceeded
	default:
	}
	return nil
}

// read copies buffered bytes into p, waiting for some when there are none.
func (b *memBuffer) read(p []byte, d *memDeadline, done <-chan struct{}) (int, error) {
	for {
		if err := memReady(d, done); err != nil {
			return 0, err
		}
		b.mu.Lock()
		if b.n > 0 {
			k := min(b.n, len(p))
			if m := copy(p[:k], b.ring[b.start:]); m < k {
				copy(p[m:k], b.ring)
			}
			b.start, b.n = (b.start+k)%b.size, b.n-k
			b.wakeLocked()
			b.mu.Unlock()
			return k, nil
		}
		if b.writeClosed {
			b.mu.Unlock()
			return 0, io.EOF
		}
		if len(p) == 0 {
			b.mu.Unlock()
			return 0, nil
		}
		b.waitUnlock(d, done)
	}
}

// write buffers all of p, waiting for room as the reader drains it.
func (b *memBuffer) write(p []byte, d *memDeadline, done <-chan struct{}) (int, error) {
	written := 0
	for {
		if err := memReady(d, done); err != nil {
			return written, err
		}
		b.mu.Lock()
		switch {
		case b.writeClosed:
			b.mu.Unlock()
			return written, net.ErrClosed
		case b.readClosed:
			b.mu.Unlock()
			return written, syscall.EPIPE
		}
		if b.n < b.size || len(p) == 0 {
			if k := min(b.size-b.n, len(p)-written); k > 0 {
				if b.ring == nil {
					b.ring = make([]byte, b.size)
				}
				end := (b.start + b.n) % b.size
				if m := copy(b.ring[end:], p[written:written+k]); m < k {
					copy(b.ring, p[written+m:written+k])
				}
				b.n += k
				written += k
				b.wakeLocked()
			}
			b.mu.Unlock()
			// Done once all of p is buffered, whatever the reader does
			// next (it may take the bytes and close at once).
			if written == len(p) {
				return written, nil
			}
			continue
		}
		b.waitUnlock(d, done)
	}
}

// closeWriter marks the end of the bytes: the reader gets io.EOF after
// the buffered ones.
func (b *memBuffer) closeWriter() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.writeClosed = true
	b.wakeLocked()
}

// closeReader drops the buffered bytes and fails further writes.
func (b *memBuffer) closeReader() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.readClosed = true
	b.ring, b.start, b.n = nil, 0, 0
	b.wakeLocked()
}

// memDeadline is a read or write deadline: expired returns a channel
// that is closed once it has passed, so that blocked operations wake,
// also when the deadline is moved into the past while they wait.
type memDeadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	passed chan struct{} // closed once the deadline passes; made on demand
}

// set sets the deadline; the zero time clears it.
func (d *memDeadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.passed // the timer fired: wait until it has closed passed
	}
	d.timer = nil
	closed := false
	if d.passed != nil {
		select {
		case <-d.passed:
			closed = true
		default:
		}
	}
	if closed {
		d.passed = nil // waiters woke on the old one and look again
	}
	if t.IsZero() {
		return
	}
	passed := d.chanLocked()
	if wait := time.Until(t); wait > 0 {
		d.timer = time.AfterFunc(wait, func() { close(passed) })
		return
	}
	close(passed)
}

func (d *memDeadline) chanLocked() chan struct{} {
	if d.passed == nil {
		d.passed = make(chan struct{})
	}
	return d.passed
}

// expired returns a channel that is closed once the deadline has passed.
func (d *memDeadline) expired() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.chanLocked()
}
