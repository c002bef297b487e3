package channels

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels/mux"
)

// The TLS data path. crypto/tls moves at most 16 KiB of plaintext per
// record and makes one call on the connection below per record: a Write of
// 256 KiB is sixteen write(2)s, each pushing its own TCP segments, and a
// reader takes one read(2) per record. With AES-GCM sealing a record in a
// few microseconds, those system calls and the per-packet work behind them
// cost more than the cipher. So a session's TLS connection runs over a
// recordConn, which
//
//   - reads ahead: one read(2) takes everything the socket holds, up to
//     tlsReadAhead bytes (many records), which tls.Conn then takes from
//     memory a record at a time; the buffer is pooled and held only while
//     it holds data, so idle sessions cost none;
//   - gathers: the records of one Write on the session (tlsSessionConn)
//     are collected and sent with one write(2) when the Write ends, or
//     whenever tlsGather bytes are waiting.
//
// Both cost a copy of the bytes in memory, much cheaper than the system
// calls and packets they save (see BenchmarkStreamThroughputTLS). Writes
// tls.Conn makes on its own (alerts, key updates) go straight through.

const (
	// tlsReadAhead is the most one read(2) takes for a TLS session.
	tlsReadAhead = 256 << 10
	// tlsGather is the most gathered before a write(2): the records of a
	// 256 KiB Write (the proxy's buffer) with their overhead.
	tlsGather = 256<<10 + 16<<10
)

var recordBufs = sync.Pool{New: func() any { b := make([]byte, 0, max(tlsReadAhead, tlsGather)); return &b }}

// tlsTransport is a node's transport when its sessions use TLS: the same
// connections, each wrapped in a recordConn for the tls.Conn on top.
type tlsTransport struct{ Transport }

func (t tlsTransport) Listen(addr string) (net.Listener, error) {
	ln, err := t.Transport.Listen(addr)
	if err != nil {
		return nil, err
	}
	return recordListener{ln}, nil
}

func (t tlsTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := t.Transport.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return newRecordConn(c), nil
}

type recordListener struct{ net.Listener }

func (l recordListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newRecordConn(c), nil
}

// recordConn is the connection under a session's tls.Conn.
type recordConn struct {
	net.Conn
	rc syscall.RawConn // nil: reads go straight to Conn
	// The read side, used by tls.Conn's reader only: buf[r:w] is read
	// but not taken yet; buf is nil while empty.
	buf       *[]byte
	r, w      int
	readCalls int // reads that reached the socket, for tests

	mu     sync.Mutex // the write side: tls.Conn's writers and Flush
	gather bool
	out    *[]byte
}

func newRecordConn(c net.Conn) *recordConn {
	rc := &recordConn{Conn: c}
	if sc, ok := c.(syscall.Conn); ok {
		rc.rc, _ = sc.SyscallConn()
	}
	return rc
}

// NetConn returns the connection under the record layer, so that the
// session reaches the TCP socket through TLS (its keepalive and write
// timeout read TCP_INFO).
func (c *recordConn) NetConn() net.Conn { return c.Conn }

// Read returns what is read ahead, or waits for the socket to be readable,
// holding no buffer, and reads what it holds.
func (c *recordConn) Read(p []byte) (int, error) {
	if c.rc == nil {
		c.readCalls++
		return c.Conn.Read(p)
	}
	if c.r == c.w {
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, (*c.buf)[c.r:c.w])
	c.r += n
	if c.r == c.w {
		c.release()
	}
	return n, nil
}

func (c *recordConn) fill() error {
	var (
		n     int
		errno error
	)
	err := c.rc.Read(func(fd uintptr) bool {
		if c.buf == nil {
			c.buf = recordBufs.Get().(*[]byte)
		}
		b := (*c.buf)[:tlsReadAhead]
		for {
			n, errno = unix.Read(int(fd), b)
			switch errno {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				c.release()
				return false // wait for readability, holding nothing
			}
			return true
		}
	})
	c.readCalls++
	switch {
	case err == nil && errno != nil:
		err = os.NewSyscallError("read", errno)
	case err == nil && n <= 0:
		err = io.EOF
	}
	if err != nil {
		c.release()
		if err != io.EOF {
			err = &net.OpError{Op: "read", Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
		}
		return err
	}
	c.r, c.w = 0, n
	return nil
}

func (c *recordConn) release() {
	if c.buf != nil {
		recordBufs.Put(c.buf)
		c.buf = nil
	}
	c.r, c.w = 0, 0
}

// Write sends p, or gathers it between startGather and flush.
func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.gather {
		return c.Conn.Write(p)
	}
	if c.out == nil {
		c.out = recordBufs.Get().(*[]byte)
	}
	if len(*c.out)+len(p) > tlsGather {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) > tlsGather {
		return c.Conn.Write(p) // never from tls.Conn: records are smaller
	}
	*c.out = append(*c.out, p...)
	return len(p), nil
}

func (c *recordConn) startGather() {
	c.mu.Lock()
	c.gather = true
	c.mu.Unlock()
}

// flush ends gathering and sends what was gathered.
func (c *recordConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gather = false
	err := c.flushLocked()
	if c.out != nil {
		recordBufs.Put(c.out)
		c.out = nil
	}
	return err
}

func (c *recordConn) flushLocked() error {
	if c.out == nil || len(*c.out) == 0 {
		return nil
	}
	_, err := c.Conn.Write(*c.out)
	*c.out = (*c.out)[:0]
	return err
}

// tlsSessionConn is a session's TLS connection: each Write's records leave
// together (see recordConn), and so do those of all the Writes between
// Gather and Flush (mux.Gatherer: a batch of frames).
type tlsSessionConn struct {
	*tls.Conn
	rc *recordConn
	// gathering is set between Gather and Flush, which the session's
	// writer calls around its Writes (only one goroutine writes at a time).
	gathering bool
}

var _ mux.Gatherer = (*tlsSessionConn)(nil)

// sessionConn returns the connection a session runs over: a TLS connection
// over a recordConn becomes a tlsSessionConn; others are left as they are.
// Call it once the handshake is done and the peer checked.
func sessionConn(c net.Conn) net.Conn {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return c
	}
	rc, ok := tc.NetConn().(*recordConn)
	if !ok {
		return c
	}
	return &tlsSessionConn{Conn: tc, rc: rc}
}

func (c *tlsSessionConn) Write(p []byte) (int, error) {
	if c.gathering {
		return c.Conn.Write(p)
	}
	c.rc.startGather()
	n, err := c.Conn.Write(p)
	if ferr := c.rc.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// Gather holds back the records of the Writes that follow, until Flush
// (recordConn writes them out once tlsGather bytes wait).
func (c *tlsSessionConn) Gather() {
	c.gathering = true
	c.rc.startGather()
}

// Flush sends the records held back since Gather.
func (c *tlsSessionConn) Flush() error {
	c.gathering = false
	return c.rc.flush()
}
