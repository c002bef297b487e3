package channels_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

// fromIP is TCP whose dials leave from a loopback address of their own,
// as if from another host: 127.0.0.0/8 is all this host's.
type fromIP struct{ ip string }

func (f fromIP) Listen(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }

func (f fromIP) Dial(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(f.ip)}}
	return d.DialContext(ctx, "tcp", addr)
}

// idleConns opens k connections from ip to addr that send nothing, and
// closes them at the end of the test. It returns them, and how many the
// node hung up on without a byte (a reset, as a refusal for overload is):
// at once, or while they were being connected.
func idleConns(t *testing.T, ip, addr string, k int) (conns []net.Conn, reset int) {
	t.Helper()
	for range k {
		c, err := fromIP{ip}.Dial(context.Background(), addr)
		if errors.Is(err, syscall.ECONNRESET) {
			reset++
			continue
		}
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	return conns, reset
}

// closedAtOnce adds to reset the connections the node hung up on without
// a byte, and checks that the others are still waiting for their
// handshake.
func closedAtOnce(t *testing.T, conns []net.Conn, reset int) int {
	t.Helper()
	for _, c := range conns {
		require.NoError(t, c.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
		_, err := c.Read(make([]byte, 1))
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		assert.ErrorIs(t, err, syscall.ECONNRESET)
		reset++
	}
	return reset
}

// TestHandshakeFloodBounded: connections that never complete their
// handshake take at most MaxHandshakesPerIP slots per address and
// MaxHandshakes in all; those beyond are closed at once and counted, and
// a member at another address still connects while they wait.
func TestHandshakeFloodBounded(t *testing.T) {
	var seen refusals
	var handshakes atomic.Int64
	cfg := baseConfig("b", channels.PlainTCPTransport(), dialers("a", "c"))
	cfg.HandshakeTimeout = time.Minute // the flood's connections stay pending
	cfg.MaxHandshakes, cfg.MaxHandshakesPerIP = 8, 3
	cfg.OnRefused = seen.add
	cfg.OnHandshake = func(string, bool, time.Duration, error) { handshakes.Add(1) }
	var reply channels.ReplyChannel
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	before := runtime.NumGoroutine()

	// 40 idle connections from one address: 3 wait, 37 are closed at once.
	flood, reset := idleConns(t, "127.0.0.1", b.Addr(), 40)
	seen.wait(t, map[string]int{channels.RefusedOverload: 37})
	assert.Equal(t, 37, closedAtOnce(t, flood, reset))
	assert.LessOrEqual(t, runtime.NumGoroutine()-before, 3+2, "goroutines held by the flood")

	// A member at another address connects meanwhile.
	client := func(iid, ip string) channels.RequestChannel {
		c := baseConfig(iid, fromIP{ip}, membership.Static(member(b, "b", map[string]uint16{"svc": 80})))
		c.ListenAddr = ""
		c.SessionsPerPeer = 1
		c.BackoffMin, c.BackoffMax = 2*time.Second, 2*time.Second
		var req channels.RequestChannel
		startNode(t, c, func(n *channels.Node) {
			var err error
			req, err = n.Request("svc", "", nil)
			require.NoError(t, err)
		})
		return req
	}
	sendThrough(t, client("a", "127.0.0.2"), reply, "b", "a", 3)

	// Two more addresses fill the total (3 + 3 + 2 of 8): beyond it,
	// every address is refused, members too.
	more, reset := idleConns(t, "127.0.0.3", b.Addr(), 3)
	more4, reset4 := idleConns(t, "127.0.0.4", b.Addr(), 3)
	more = append(more, more4...)
	seen.wait(t, map[string]int{channels.RefusedOverload: 38})
	assert.Equal(t, 1, closedAtOnce(t, more, reset+reset4))
	req := client("c", "127.0.0.5")
	// An overloaded peer may take the next dial: the Open would dial
	// again until its deadline, which comes before the backoff ends.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, _, err := req.Open(ctx, channels.Header{})
	require.Error(t, err)
	seen.wait(t, map[string]int{channels.RefusedOverload: 39}) // the member's dial

	// Handshakes that end give their slot back.
	for _, c := range append(flood, more...) {
		c.Close()
	}
	// a's handshake, then those of the flood.
	require.Eventually(t, func() bool { return handshakes.Load() >= 1+8 }, 5*time.Second, 5*time.Millisecond,
		"the pending handshakes end when their connections close")
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s, _, err := req.Open(ctx, channels.Header{})
		if err == nil {
			s.Close()
		}
		return err == nil
	}, 5*time.Second, 20*time.Millisecond, "the member connects once the flood is gone")
}

// emfileListener fails its first accepts as a process out of file
// descriptors does, recording when each was called.
type emfileListener struct {
	net.Listener
	fail int

	mu    sync.Mutex
	calls []time.Time
}

func (l *emfileListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.calls = append(l.calls, time.Now())
	failing := len(l.calls) <= l.fail
	l.mu.Unlock()
	if failing {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

func (l *emfileListener) errorTimes() []time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]time.Time(nil), l.calls[:min(l.fail, len(l.calls))]...)
}

type emfileTransport struct {
	channels.Transport
	ln *emfileListener
}

func (t *emfileTransport) Listen(addr string) (net.Listener, error) {
	ln, err := t.Transport.Listen(addr)
	if err != nil {
		return nil, err
	}
	t.ln.Listener = ln
	return t.ln, nil
}

// TestAcceptOutOfFilesBacksOff: while accept fails (EMFILE), the accept
// loop waits between attempts rather than spinning, logs once rather
// than once per failure, and serves peers again once accept works.
func TestAcceptOutOfFilesBacksOff(t *testing.T) {
	const fail = 12
	logs := &logLines{}
	tr := &emfileTransport{Transport: channels.PlainTCPTransport(), ln: &emfileListener{fail: fail}}
	var reply channels.ReplyChannel
	cfg := baseConfig("b", tr, dialers("a"))
	cfg.Logger = slog.New(logs)
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	ca := baseConfig("a", channels.PlainTCPTransport(), membership.Static(member(b, "b", map[string]uint16{"svc": 80})))
	ca.ListenAddr = ""
	var req channels.RequestChannel
	startNode(t, ca, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	sendThrough(t, req, reply, "b", "a", 1)

	times := tr.ln.errorTimes()
	require.Len(t, times, fail)
	for i := 1; i < len(times); i++ {
		require.GreaterOrEqual(t, times[i].Sub(times[i-1]), 5*time.Millisecond, "accept %d came too soon after a failure", i)
	}
	assert.Equal(t, 1, logs.count("accept failed; retrying"), "one line for %d failures:\n%v", fail, logs.lines())
}
