package channels_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// memberSession does member h's handshake with the node at addr by hand,
// as a hostile member would, and returns its session (nil, and the
// reason, when refused). The session closes at the end of the test.
func memberSession(t *testing.T, tr channels.Transport, addr string, h wire.Hello) (*mux.Session, string) {
	t.Helper()
	c := rawDial(t, tr, addr)
	require.NoError(t, wire.WriteHello(c, h))
	rp, err := wire.ReadReply(c)
	require.NoError(t, err)
	if !rp.Accepted {
		return nil, rp.Reason
	}
	require.NoError(t, c.SetDeadline(time.Time{}))
	// A hostile member does not wait for the node to accept its streams.
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler), MaxPendingOpens: 1 << 16})
	require.NoError(t, err)
	t.Cleanup(func() { sess.Close() })
	return sess, ""
}

// goroutinesIn counts the goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			k := 0
			for _, g := range bytes.Split(buf[:n], []byte("\n\n")) {
				if bytes.Contains(g, []byte(fn)) {
					k++
				}
			}
			return k
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestSlowStreamHeadersBounded: a member that opens thousands of streams
// and sends their headers slowly (one byte, then nothing) holds a bounded
// number of goroutines, each until the header timeout; another member's
// streams are not held up.
func TestSlowStreamHeadersBounded(t *testing.T) {
	const handleStream = "channels.(*session).handleStream"
	tr := channels.NewMemoryTransport()
	var seen refusals
	var reply channels.ReplyChannel
	cfg := baseConfig("b", tr, dialers("x", "y"))
	cfg.HandshakeTimeout = time.Second
	cfg.OnRefused = seen.add
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	x, _ := memberSession(t, tr, b.Addr(), wire.Hello{IID: "x", Role: "test"})
	const flood = 3000
	ctx := context.Background()
	for range flood {
		st, err := x.OpenStream(ctx)
		require.NoError(t, err)
		_, err = st.Write([]byte{wire.Version})
		require.NoError(t, err)
	}
	_, err := x.Ping(ctx) // the node has read every stream's first frame
	require.NoError(t, err)
	// Past the streams being handled and the multiplexer's backlog, the
	// flood is refused, and counted.
	refused := b.Status().Limits.RefusedBacklog
	require.Positive(t, refused)

	require.Eventually(t, func() bool { return goroutinesIn(handleStream) >= 256 }, 5*time.Second, time.Millisecond)
	assert.Never(t, func() bool { return goroutinesIn(handleStream) > 256 }, 300*time.Millisecond, time.Millisecond,
		"streams waiting for their header")

	// Another member's session is not held up.
	y, _ := memberSession(t, tr, b.Addr(), wire.Hello{IID: "y", Role: "test"})
	st, err := y.OpenStream(ctx)
	require.NoError(t, err)
	h, err := wire.AppendStreamHeader(nil, wire.StreamHeader{Channel: "svc", SourceIID: "y", SourcePort: 9})
	require.NoError(t, err)
	_, err = st.Write(append(h, "hello"...))
	require.NoError(t, err)
	require.NoError(t, st.CloseWrite())
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	in, err := reply.Accept(actx)
	require.NoError(t, err)
	assert.Equal(t, "y", in.Peer.IID)
	got, err := io.ReadAll(in.Stream)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))
	in.Stream.Close()

	// The slow headers time out, each counted, and free their slots for
	// the streams the multiplexer held meanwhile.
	require.Eventually(t, func() bool { return seen.get()[channels.RefusedTimeout] > 256 }, 10*time.Second, 10*time.Millisecond,
		"slow headers refused: %v", seen.get())

	// The counts outlive the session.
	x.Close()
	require.Eventually(t, func() bool {
		for _, s := range b.Status().Sessions {
			if s.Peer == "x" {
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond)
	require.GreaterOrEqual(t, b.Status().Limits.RefusedBacklog, refused)
}

// TestSessionsPerMemberBounded: a member that keeps dialing sessions and
// never closes them holds a bounded number; beyond it, its dials are
// refused as overload, with the reason, and counted.
func TestSessionsPerMemberBounded(t *testing.T) {
	tr := channels.NewMemoryTransport()
	var seen refusals
	cfg := baseConfig("b", tr, dialers("x"))
	cfg.OnRefused = seen.add
	b := startNode(t, cfg, nil)
	const most = 4 * channels.MaxSessionsPerPeer
	for i := range most + 5 {
		sess, reason := memberSession(t, tr, b.Addr(), wire.Hello{IID: "x", Role: "test"})
		if i < most {
			require.NotNil(t, sess, "session %d refused: %s", i, reason)
			// The node registers it after its answer.
			require.Eventually(t, func() bool { return b.NumSessions("x") == i+1 }, 5*time.Second, time.Millisecond)
			continue
		}
		require.True(t, sess == nil, "session %d accepted", i)
		assert.Contains(t, reason, fmt.Sprintf(`member "x" already holds %d sessions it dialed`, most))
	}
	assert.Equal(t, most, b.NumSessions("x"))
	seen.wait(t, map[string]int{channels.RefusedOverload: 5})
}

// TestSessionChurnLeaksNothing: a member that dials, opens a stream and
// hangs up, again and again, with a handshake listing every channel it
// may, leaves no goroutine, session or peer behind, and a bounded number
// of log lines.
func TestSessionChurnLeaksNothing(t *testing.T) {
	defer channels.SetRefusalLogInterval(time.Hour)()
	tr := channels.NewMemoryTransport()
	var reply channels.ReplyChannel
	logs := &logLines{info: true}
	cfg := baseConfig("b", tr, dialers("x"))
	cfg.Logger = slog.New(logs)
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	many := []string{"svc"}
	for i := len(many); i < wire.MaxChannels; i++ {
		many = append(many, fmt.Sprintf("channel-%04d", i))
	}
	h, err := wire.AppendStreamHeader(nil, wire.StreamHeader{Channel: "svc", SourceIID: "x"})
	require.NoError(t, err)
	for range 300 {
		c, err := tr.Dial(context.Background(), b.Addr())
		require.NoError(t, err)
		require.NoError(t, wire.WriteHello(c, wire.Hello{IID: "x", Role: "test", Channels: many}))
		rp, err := wire.ReadReply(c)
		require.NoError(t, err)
		require.True(t, rp.Accepted, rp.Reason)
		// A hostile member does not wait for the node to accept its streams.
		sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler), MaxPendingOpens: 1 << 16})
		require.NoError(t, err)
		st, err := sess.OpenStream(context.Background())
		require.NoError(t, err)
		_, err = st.Write(h)
		require.NoError(t, err)
		in, err := reply.Accept(context.Background())
		require.NoError(t, err)
		in.Stream.Reset()
		sess.Close()
	}
	require.Eventually(t, func() bool { return b.NumSessions("x") == 0 && len(b.Status().Sessions) == 0 }, 5*time.Second, 5*time.Millisecond)
	// A line per session up and closed at first, the rest summed up.
	const burst = 2 * channels.MaxSessionsPerPeer
	assert.Equal(t, burst, logs.count("session up")+logs.count("session closed"))
	// No goroutine of a session is left, on either side.
	require.Eventually(t, func() bool {
		return goroutinesIn("tcpproxy/channels/mux.")+goroutinesIn("channels.(*session)")+goroutinesIn("channels.(*Node).serveConn") == 0
	}, 5*time.Second, 5*time.Millisecond, "goroutines of sessions left")
	require.NoError(t, b.Close())
	assert.Equal(t, 1, logs.count("sessions up and closed again"))
}

// retirer is a hostile member's listener: it accepts every session,
// resets the streams it is sent, and at once asks the dialer to retire
// the session, which it then keeps open.
type retirer struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
}

func newRetirer(t *testing.T, tr channels.Transport, addr string) *retirer {
	ln, err := tr.Listen(addr)
	require.NoError(t, err)
	r := &retirer{ln: ln}
	r.wg.Go(func() {
		var sessions []*mux.Session
		defer func() {
			for _, s := range sessions {
				s.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.accepted.Add(1)
			if s := r.serve(c); s != nil {
				sessions = append(sessions, s)
			}
		}
	})
	t.Cleanup(func() { ln.Close(); r.wg.Wait() })
	return r
}

func (r *retirer) serve(c net.Conn) *mux.Session {
	if _, err := wire.ReadHello(c); err != nil {
		c.Close()
		return nil
	}
	if wire.WriteReply(c, wire.Reply{Accepted: true, Hello: wire.Hello{IID: "y", Role: "test", Channels: []string{"svc"}}}) != nil {
		c.Close()
		return nil
	}
	sess, err := mux.Server(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		c.Close()
		return nil
	}
	r.wg.Go(func() {
		for {
			st, err := sess.AcceptStream(context.Background())
			if err != nil {
				return
			}
			st.Reset()
		}
	})
	r.wg.Go(func() {
		st, err := sess.OpenStream(context.Background())
		if err != nil {
			return
		}
		h, _ := wire.AppendStreamHeader(nil, wire.StreamHeader{Channel: "\x00retire", SourceIID: "y"})
		if _, err := st.Write(h); err == nil && st.CloseWrite() == nil {
			_, _ = io.Copy(io.Discard, st) // the answer
		}
		st.Close()
	})
	return sess
}

// TestPeerRetiringEverySession: a member that asks to retire every
// session the node dials to it at once does not make the node dial it
// again and again, and the node closes the retired sessions once idle
// rather than wait for the member to.
func TestPeerRetiringEverySession(t *testing.T) {
	tr := channels.NewMemoryTransport()
	y := newRetirer(t, tr, "y:1")
	cfg := baseConfig("b", tr, membership.Static(channels.Member{IID: "y", Role: "test", Addr: "y:1", Channels: map[string]uint16{"svc": 1}}))
	cfg.ListenAddr = ""
	var req channels.RequestChannel
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, _, err := req.Open(ctx, channels.Header{})
	require.NoError(t, err)
	s.Close()
	// The open dials SessionsPerPeer sessions, or a few times that if it
	// finds them retired, and then the node dials no more.
	require.Eventually(t, func() bool { return !b.Dialing("y") }, 5*time.Second, time.Millisecond, "dials in progress")
	dialed := y.accepted.Load()
	assert.LessOrEqual(t, dialed, int64(3*2), "sessions dialed for one stream")
	assert.Never(t, func() bool { return y.accepted.Load() > dialed }, 300*time.Millisecond, time.Millisecond,
		"sessions dialed to a member that retires them at once")
	t.Logf("%d sessions dialed", y.accepted.Load())
	require.Eventually(t, func() bool { return b.NumSessions("y") == 0 }, 5*time.Second, time.Millisecond,
		"the retired sessions close once idle")
}
