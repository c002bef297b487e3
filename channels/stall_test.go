package channels_test

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

// TestNewStreamAvoidsStalledSession: when the only session to a peer has
// waited for seconds on a write that makes no progress (its link carries
// nothing for now), a new stream does not join it, where it would wait
// behind the stall: the node dials another session and the stream works
// at once. The stalled session carries on meanwhile.
func TestNewStreamAvoidsStalledSession(t *testing.T) {
	tr := &holdingTransport{MemoryTransport: channels.NewMemoryTransport()}
	req, reply, a, _ := pair(t, tr, func(c *channels.Config) { c.SessionsPerPeer = 1 })
	s, in := open(t, req, reply)
	defer in.Stream.Close()
	defer s.Close()

	tr.hold() // b stops reading what it has accepted so far
	t.Cleanup(tr.release)
	go func() { _, _ = s.Write(make([]byte, 1<<20)) }()
	require.Eventually(t, func() bool { return a.StalledSessions("b") == 1 }, 10*time.Second, 10*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s2, _, err := req.Open(ctx, channels.Header{SourcePort: 2})
	require.NoError(t, err)
	defer s2.Close()
	_, err = s2.Write([]byte("through"))
	require.NoError(t, err)
	require.NoError(t, s2.CloseWrite())
	in2, err := reply.Accept(ctx)
	require.NoError(t, err, "the new stream waited behind the stalled session")
	defer in2.Stream.Close()
	got, err := io.ReadAll(in2.Stream)
	require.NoError(t, err)
	require.Equal(t, "through", string(got))
	require.Equal(t, 2, a.NumSessions("b"), "a session dialed beside the stalled one")
	require.Equal(t, 1, a.StalledSessions("b"))
}

// TestStalledSessionIsLastResort: when no session can be dialed beside a
// stalled one, an Open with no other member to try gets the stalled
// session rather than an error, and its stream goes through once the link
// moves again.
func TestStalledSessionIsLastResort(t *testing.T) {
	tr := &holdingTransport{MemoryTransport: channels.NewMemoryTransport()}
	req, reply, a, _ := pair(t, tr, func(c *channels.Config) { c.SessionsPerPeer = 1 })
	s, in := open(t, req, reply)
	defer s.Close()
	go func() { _, _ = io.Copy(io.Discard, in.Stream) }()

	tr.hold()
	t.Cleanup(tr.release)
	tr.refuse.Store(true)
	wrote := make(chan error, 1)
	go func() {
		_, err := s.Write(make([]byte, 1<<20))
		wrote <- err
	}()
	require.Eventually(t, func() bool { return a.StalledSessions("b") == 1 }, 10*time.Second, 10*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s2, _, err := req.Open(ctx, channels.Header{SourcePort: 2})
	require.NoError(t, err, "the only member's stalled session was refused")
	defer s2.Close()
	require.Equal(t, 1, a.NumSessions("b"))
	tr.release()
	_, err = s2.Write([]byte("after"))
	require.NoError(t, err)
	require.NoError(t, s2.CloseWrite())
	in2, err := reply.Accept(ctx)
	require.NoError(t, err)
	defer in2.Stream.Close()
	got, err := io.ReadAll(in2.Stream)
	require.NoError(t, err)
	require.Equal(t, "after", string(got))
	require.NoError(t, <-wrote, "the stalled stream's data went through")
}

// TestStalledMemberAfterTheOthers: a request channel whose picked member
// has only stalled sessions (and no other to be had) tries the other
// members first; when none of them can be reached either, it comes back
// to the stalled session rather than fail.
func TestStalledMemberAfterTheOthers(t *testing.T) {
	tr := &holdingTransport{MemoryTransport: channels.NewMemoryTransport()}
	var reply channels.ReplyChannel
	cb := baseConfig("b", tr, dialers("a"))
	b := startNode(t, cb, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	ca := baseConfig("a", tr, membership.Static(member(b, "b", map[string]uint16{"svc": 80}),
		channels.Member{IID: "c", Role: "test", Addr: "127.0.0.1:1", Channels: map[string]uint16{"svc": 80}}))
	ca.ListenAddr, ca.SessionsPerPeer = "", 1
	var req channels.RequestChannel
	a := startNode(t, ca, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", firstOf("b"))
		require.NoError(t, err)
	})
	s, in := open(t, req, reply)
	defer s.Close()
	go func() { _, _ = io.Copy(io.Discard, in.Stream) }()

	tr.hold()
	t.Cleanup(tr.release)
	tr.refuse.Store(true) // no new session to b; c cannot be reached at all
	go func() { _, _ = s.Write(make([]byte, 1<<20)) }()
	require.Eventually(t, func() bool { return a.StalledSessions("b") == 1 }, 10*time.Second, 10*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s2, m, err := req.Open(ctx, channels.Header{SourcePort: 2})
	require.NoError(t, err, "no member was tried again")
	defer s2.Close()
	require.Equal(t, "b", m.IID)
}

// firstOf is a balancer that picks member iid whenever it is a candidate.
type firstOf string

func (f firstOf) Pick(cands []channels.Candidate) int {
	for i, c := range cands {
		if c.Member.IID == string(f) {
			return i
		}
	}
	return 0
}

// holdingTransport is a MemoryTransport whose listeners' connections stop
// reading on hold (those accepted until then) and go on at release, and
// whose dials fail while refuse is set.
type holdingTransport struct {
	*channels.MemoryTransport
	refuse atomic.Bool
	mu     sync.Mutex
	conns  []*holdConn
}

func (t *holdingTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	if t.refuse.Load() {
		return nil, &net.OpError{Op: "dial", Net: "memory", Err: syscall.ECONNREFUSED}
	}
	return t.MemoryTransport.Dial(ctx, addr)
}

func (t *holdingTransport) Listen(addr string) (net.Listener, error) {
	ln, err := t.MemoryTransport.Listen(addr)
	if err != nil {
		return nil, err
	}
	return &holdingListener{Listener: ln, t: t}, nil
}

func (t *holdingTransport) hold() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.conns {
		c.mu.Lock()
		c.held = make(chan struct{})
		c.mu.Unlock()
	}
}

func (t *holdingTransport) release() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.conns {
		c.mu.Lock()
		if c.held != nil {
			close(c.held)
			c.held = nil
		}
		c.mu.Unlock()
	}
}

type holdingListener struct {
	net.Listener
	t *holdingTransport
}

func (l *holdingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	hc := &holdConn{Conn: c}
	l.t.mu.Lock()
	l.t.conns = append(l.t.conns, hc)
	l.t.mu.Unlock()
	return hc, nil
}

// holdConn's Reads wait while it is held.
type holdConn struct {
	net.Conn
	mu   sync.Mutex
	held chan struct{}
}

func (c *holdConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	held := c.held
	c.mu.Unlock()
	if held != nil {
		<-held
	}
	return c.Conn.Read(p)
}
