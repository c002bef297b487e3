package channels

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
)

// MemoryTransport is an in-process Transport: Listen registers a listener
// under an address string and Dial connects to it through net.Pipe, so
// tests run the real handshake and multiplexer hermetically. The zero value
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
	client, server := net.Pipe()
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
	case l.conns <- &memConn{Conn: server, local: l.addr, remote: local}:
		return &memConn{Conn: client, local: local, remote: remote}, nil
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

// memConn gives a pipe end meaningful addresses for logs.
type memConn struct {
	net.Conn
	local, remote net.Addr
}

func (c *memConn) LocalAddr() net.Addr  { return c.local }
func (c *memConn) RemoteAddr() net.Addr { return c.remote }

type memAddr string

func (memAddr) Network() string  { return "memory" }
func (a memAddr) String() string { return string(a) }
