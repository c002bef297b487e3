// Package proxytest is the conformance suite that every proxy.Network must
// pass, and the harness it runs on: a cluster of proxies joined by the
// in-memory channel transport, each with its own network view and a Host on
// which the test's legacy programs run.
package proxytest

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// Host is where an instance's legacy programs open sockets: the kernel for
// the loopback and TUN networks, the peer gVisor stack for the memory one.
type Host interface {
	Listen(ctx context.Context, addr netip.AddrPort) (net.Listener, error)
	Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
}

// Instance is the environment of one proxy under test.
type Instance struct {
	Network    proxy.Network
	Host       Host
	Addressing proxy.Addressing
}

// NewInstance makes the environment of the i-th proxy of a test (i counts
// from 0 inside each test). It registers its own cleanup with t.
type NewInstance func(t testing.TB, i int) Instance

// Timeout bounds every wait in the suite; nothing waits by sleeping.
const Timeout = 15 * time.Second

// Cluster is a set of proxies sharing one in-memory channel transport and
// one dynamic membership.
type Cluster struct {
	t       testing.TB
	newInst NewInstance
	// Transport carries the sessions between proxies; set it before the
	// first Add (default: the in-memory transport).
	Transport channels.Transport
	members   *membership.Dynamic

	mu    sync.Mutex
	nodes map[string]*Node
	list  []channels.Member
}

// NewCluster starts an empty cluster whose proxies get their environment
// from newInst.
func NewCluster(t testing.TB, newInst NewInstance) *Cluster {
	return &Cluster{
		t:         t,
		newInst:   newInst,
		Transport: channels.NewMemoryTransport(),
		members:   membership.NewDynamic(),
		nodes:     make(map[string]*Node),
	}
}

// Node is one running proxy of a Cluster.
type Node struct {
	IID    string
	Proxy  *proxy.Proxy
	Mesh   *channels.Node
	Inst   Instance
	Events *Recorder
	member channels.Member
	closed bool
}

// Add creates, starts and publishes a proxy; it is stopped at test end.
func (c *Cluster) Add(iid, role string, chans map[string]proxy.ChannelConfig) *Node {
	t := c.t
	c.mu.Lock()
	inst := c.newInst(t, len(c.nodes))
	c.mu.Unlock()
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	listen := "mem-" + iid
	if _, mem := c.Transport.(*channels.MemoryTransport); !mem {
		listen = "127.0.0.1:0"
	}
	mesh, err := channels.NewNode(channels.Config{
		IID:        iid,
		Role:       role,
		ListenAddr: listen,
		Transport:  c.Transport,
		Members:    c.members,
		Logger:     logger,
		BackoffMin: time.Millisecond,
		BackoffMax: 20 * time.Millisecond,
	})
	require.NoError(t, err)
	p, err := proxy.New(proxy.Config{
		IID: iid, Role: role, Channels: chans,
		Addressing: inst.Addressing, Network: inst.Network, Mesh: mesh, Logger: logger,
	})
	require.NoError(t, err)
	n := &Node{IID: iid, Proxy: p, Mesh: mesh, Inst: inst, Events: Record(p.Events())}
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	require.NoError(t, mesh.Start(ctx))
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() { c.Stop(iid) })

	m := p.Self()
	n.member = m
	c.mu.Lock()
	c.nodes[iid] = n
	c.list = append(c.list, m)
	c.members.Set(append([]channels.Member(nil), c.list...)...)
	c.mu.Unlock()
	return n
}

// Leave removes iid from the membership without stopping its proxy.
func (c *Cluster) Leave(iid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var keep []channels.Member
	for _, m := range c.list {
		if m.IID != iid {
			keep = append(keep, m)
		}
	}
	c.list = keep
	c.members.Set(append([]channels.Member(nil), keep...)...)
}

// Stop shuts iid's proxy and mesh down (idempotent) and checks that Closed
// was its last event.
func (c *Cluster) Stop(iid string) {
	c.mu.Lock()
	n := c.nodes[iid]
	if n == nil || n.closed {
		c.mu.Unlock()
		return
	}
	n.closed = true
	c.mu.Unlock()
	c.Leave(iid)
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	require.NoError(c.t, n.Proxy.Shutdown(ctx))
	require.NoError(c.t, n.Mesh.Close())
	n.Events.WaitClosed(c.t)
}

// Node returns a running node.
func (c *Cluster) Node(iid string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[iid]
}

// Dial connects from n's host to addr.
func (n *Node) Dial(t testing.TB, addr netip.AddrPort) net.Conn {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	conn, err := n.Inst.Host.Dial(ctx, addr)
	require.NoError(t, err, "dial %s from %s's host", addr, n.IID)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// RequestAddr is where n's legacy client reaches request channel name.
func (n *Node) RequestAddr(t testing.TB, name string) netip.AddrPort {
	a, ok := n.Proxy.RequestAddr(name)
	require.True(t, ok, "no request channel %s", name)
	return a
}

// IPOf is the address n's legacy programs see for iid.
func (n *Node) IPOf(t testing.TB, iid string) netip.Addr {
	ip, err := n.Proxy.InstanceIP(iid)
	require.NoError(t, err)
	return ip
}

// Serve runs handler for every connection to n's bind IP:port on n's
// host, until the test ends.
func (n *Node) Serve(t testing.TB, port uint16, handler func(net.Conn)) {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	addr := netip.AddrPortFrom(n.Proxy.BindIP(), port)
	ln, err := n.Inst.Host.Listen(ctx, addr)
	require.NoError(t, err, "legacy server listen %s", addr)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				handler(conn)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// Recorder collects a proxy's events for ordered assertions.
type Recorder struct {
	mu     sync.Mutex
	events []proxy.Event
	notify chan struct{}
	done   chan struct{}
	next   int
}

// Record drains ch into a new Recorder until ch is closed.
func Record(ch <-chan proxy.Event) *Recorder {
	r := &Recorder{notify: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for e := range ch {
			r.mu.Lock()
			r.events = append(r.events, e)
			r.mu.Unlock()
			select {
			case r.notify <- struct{}{}:
			default:
			}
		}
	}()
	return r
}

// Next returns the next event not yet returned, waiting for it.
func (r *Recorder) Next(t testing.TB) proxy.Event {
	t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		if r.next < len(r.events) {
			e := r.events[r.next]
			r.next++
			r.mu.Unlock()
			return e
		}
		r.mu.Unlock()
		select {
		case <-r.notify:
		case <-r.done:
			r.mu.Lock()
			more := r.next < len(r.events)
			r.mu.Unlock()
			if !more {
				require.FailNow(t, "event stream closed while waiting for the next event")
			}
		case <-deadline.C:
			require.FailNow(t, "no event within timeout")
		}
	}
}

// NextChange skips non-Change events (failing on Error) and returns the
// next Change of channel.
func (r *Recorder) NextChange(t testing.TB, channel string) proxy.Change {
	t.Helper()
	for {
		switch e := r.Next(t).(type) {
		case proxy.Change:
			if e.Channel == channel {
				return e
			}
		case proxy.Error:
			require.FailNow(t, "unexpected error event", "%v", e)
		}
	}
}

// All returns every event recorded so far.
func (r *Recorder) All() []proxy.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]proxy.Event(nil), r.events...)
}

// WaitClosed waits until the event stream is closed and checks that its
// last event was Closed.
func (r *Recorder) WaitClosed(t testing.TB) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(Timeout):
		require.FailNow(t, "event stream not closed after Shutdown")
	}
	all := r.All()
	require.NotEmpty(t, all)
	require.IsType(t, proxy.Closed{}, all[len(all)-1], "last event")
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Logf("%s", b)
	return len(b), nil
}

// readAll reads c to EOF with the suite's timeout.
func readAll(c net.Conn) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(Timeout))
	return io.ReadAll(c)
}
