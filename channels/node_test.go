package channels_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

func TestNewNodeValidates(t *testing.T) {
	for name, tc := range map[string]struct {
		cfg  channels.Config
		want string
	}{
		"no iid":         {channels.Config{}, "IID is empty"},
		"long iid":       {channels.Config{IID: string(make([]byte, 256))}, "IID length 256 exceeds 255"},
		"negative":       {channels.Config{IID: "a", DialTimeout: -1}, "DialTimeout -1ns is negative"},
		"backoff order":  {channels.Config{IID: "a", BackoffMin: time.Second, BackoffMax: time.Millisecond}, "BackoffMin 1s exceeds BackoffMax 1ms"},
		"small window":   {channels.Config{IID: "a", MaxStreamWindow: 1024}, "MaxStreamWindow 1024 is below"},
		"small buffer":   {channels.Config{IID: "a", MaxSessionBuffered: 1024}, "MaxSessionBuffered 1024 is below"},
		"negative queue": {channels.Config{IID: "a", AcceptBacklog: -1}, "AcceptBacklog -1 is negative"},
		"sessions":       {channels.Config{IID: "a", SessionsPerPeer: 17}, "SessionsPerPeer 17 is outside [0, 16]"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := channels.NewNode(tc.cfg)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestRegistration(t *testing.T) {
	n, err := channels.NewNode(baseConfig("a", channels.NewMemoryTransport(), nil))
	require.NoError(t, err)
	defer n.Close()
	_, err = n.Reply("x")
	require.NoError(t, err)
	_, err = n.Duplex("x")
	require.ErrorContains(t, err, "already registered")
	_, err = n.Request("", "", nil)
	require.ErrorContains(t, err, "empty")
	require.NoError(t, n.Start(context.Background()))
	_, err = n.Reply("y")
	require.ErrorContains(t, err, "before Start")
	require.Error(t, n.Start(context.Background()), "second Start")
}

func TestMemoryTransportRefused(t *testing.T) {
	tr := channels.NewMemoryTransport()
	_, err := tr.Dial(context.Background(), "127.0.0.1:9")
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
	require.ErrorContains(t, err, "connection refused")
	ln, err := tr.Listen("127.0.0.1:0")
	require.NoError(t, err)
	_, err = tr.Listen(ln.Addr().String())
	require.ErrorIs(t, err, syscall.EADDRINUSE)
	require.NoError(t, ln.Close())
	_, err = ln.Accept()
	require.Error(t, err)
}

func TestOpenWithoutMembers(t *testing.T) {
	var req channels.RequestChannel
	startNode(t, baseConfig("a", channels.NewMemoryTransport(), membership.Static()), func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	_, _, err := req.Open(context.Background(), channels.Header{})
	require.ErrorIs(t, err, channels.ErrNoMembers)
}

// TestRestartPeer kills the serving node and starts it again at the same
// address: open streams fail, Opens fail fast while backing off, and new
// streams work again once the peer is back.
func TestRestartPeer(t *testing.T) {
	tr := channels.NewMemoryTransport()
	startB := func(addr string) (*channels.Node, channels.ReplyChannel) {
		cfg := baseConfig("b", tr, dialers("a"))
		cfg.ListenAddr = addr
		n, err := channels.NewNode(cfg)
		require.NoError(t, err)
		reply, err := n.Reply("svc")
		require.NoError(t, err)
		require.NoError(t, n.Start(context.Background()))
		return n, reply
	}
	b, reply := startB("127.0.0.1:0")
	addr := b.Addr()
	cfg := baseConfig("a", tr, membership.Static(channels.Member{IID: "b", Addr: addr, Channels: map[string]uint16{"svc": 80}}))
	// The first retry comes 100-200ms after a failed dial: later than the
	// quick Opens' deadline.
	cfg.BackoffMin, cfg.BackoffMax = 200*time.Millisecond, 400*time.Millisecond
	var req channels.RequestChannel
	a := startNode(t, cfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", channels.LeastStreams())
		require.NoError(t, err)
	})

	s, in := open(t, req, reply)
	_, err := s.Write([]byte("hello"))
	require.NoError(t, err)

	// The first open dials the second of SessionsPerPeer in the
	// background; were it still dialing when b closes, b could accept it
	// and a take it for a live session after the others ended.
	sessionsUp(t, a, "b", channels.DefaultSessionsPerPeer)
	require.NoError(t, b.Close()) // the peer dies
	_, err = io.ReadAll(s)
	require.Error(t, err, "an open stream fails when its peer dies")
	_, err = in.Stream.Read(make([]byte, 1))
	require.Error(t, err)
	sessionsGone(t, a, "b")
	require.Eventually(t, func() bool { return len(channels.ActiveStreams(req)) == 0 },
		5*time.Second, 5*time.Millisecond)

	// An Open with no time to wait for the next dial fails at once.
	ctx := context.Background()
	quick := func() error {
		ctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond) // before any retry is due
		defer cancel()
		_, _, err := req.Open(ctx, channels.Header{})
		return err
	}
	err = quick()
	require.Error(t, err, "peer is down")
	require.ErrorIs(t, err, channels.ErrNoMembers)
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
	require.ErrorIs(t, quick(), channels.ErrBackoff, "a second Open right away fails fast")

	b, reply = startB(addr) // the peer comes back at the same address
	defer b.Close()
	patient, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s2, _, err := req.Open(patient, channels.Header{SourcePort: 2})
	require.NoError(t, err, "an Open with time to wait reconnects after the backoff")
	_, err = s2.Write([]byte("again"))
	require.NoError(t, err)
	require.NoError(t, s2.CloseWrite())
	in2, err := reply.Accept(ctx)
	require.NoError(t, err)
	got, err := io.ReadAll(in2.Stream)
	require.NoError(t, err)
	require.Equal(t, "again", string(got))
	require.NoError(t, in2.Stream.Close())
	require.NoError(t, s2.Close())
}

// sessionsUp waits until n has want sessions with peer iid, so that no
// dial of one is under way.
func sessionsUp(t *testing.T, n *channels.Node, iid string, want int) {
	t.Helper()
	require.Eventually(t, func() bool { return n.NumSessions(iid) == want }, 5*time.Second, time.Millisecond)
}

// sessionsGone waits until n has seen the end of all its sessions with
// peer iid (there are SessionsPerPeer, and each notices the end by
// itself): until then, an Open may still pick one of them and succeed, only
// for its stream to be reset.
func sessionsGone(t *testing.T, n *channels.Node, iid string) {
	t.Helper()
	require.Eventually(t, func() bool { return n.NumSessions(iid) == 0 }, 5*time.Second, time.Millisecond)
}

// TestRestartPeerTCP runs over TCPTransport, which takes the same-host
// socket here (the restarted peer listens on it again), and over plain
// TCP.
func TestRestartPeerTCP(t *testing.T) {
	t.Run("same-host", func(t *testing.T) { testRestartPeer(t, channels.TCPTransport()) })
	t.Run("plain", func(t *testing.T) { testRestartPeer(t, channels.PlainTCPTransport()) })
}

func testRestartPeer(t *testing.T, tr channels.Transport) {
	req, reply, a, b := pair(t, tr, nil)
	s, _ := open(t, req, reply)
	addr := b.Addr()
	sessionsUp(t, a, "b", channels.DefaultSessionsPerPeer)
	require.NoError(t, b.Close())
	_, err := io.ReadAll(s)
	require.ErrorIs(t, err, channels.ErrStreamReset, "a lost session resets its streams")
	sessionsGone(t, a, "b")

	cfg := baseConfig("b", tr, dialers("a"))
	cfg.ListenAddr = addr
	startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	require.Eventually(t, func() bool {
		s, _, err := req.Open(context.Background(), channels.Header{})
		if err != nil {
			return false
		}
		s.Close()
		return true
	}, 10*time.Second, 10*time.Millisecond)
	in, err := reply.Accept(context.Background())
	require.NoError(t, err)
	in.Stream.Close()
}

func TestBalancing(t *testing.T) {
	tr := channels.NewMemoryTransport()
	var members []channels.Member
	replies := map[string]channels.ReplyChannel{}
	for _, iid := range []string{"s1", "s2", "s3"} {
		n := startNode(t, baseConfig(iid, tr, dialers("c")), func(n *channels.Node) {
			r, err := n.Reply("svc")
			require.NoError(t, err)
			replies[iid] = r
		})
		members = append(members, member(n, iid, map[string]uint16{"svc": 80}))
	}
	// One listed member serves another channel only, one is the client.
	members = append(members, channels.Member{IID: "other", Addr: "127.0.0.1:1", Channels: map[string]uint16{"x": 1}})
	cfg := baseConfig("c", tr, membership.Static(append(members, channels.Member{IID: "c", Addr: "x:1", Channels: map[string]uint16{"svc": 80}})...))
	var rr, ls channels.RequestChannel
	startNode(t, cfg, func(n *channels.Node) {
		var err error
		rr, err = n.Request("rr", "svc", nil)
		require.NoError(t, err)
		ls, err = n.Request("ls", "svc", channels.LeastStreams())
		require.NoError(t, err)
	})
	ctx := context.Background()

	t.Run("round robin", func(t *testing.T) {
		counts := map[string]int{}
		for range 6 {
			s, m, err := rr.Open(ctx, channels.Header{})
			require.NoError(t, err)
			counts[m.IID]++
			require.NoError(t, s.Reset())
		}
		assert.Equal(t, map[string]int{"s1": 2, "s2": 2, "s3": 2}, counts)
	})

	t.Run("least streams", func(t *testing.T) {
		open := map[string]channels.Stream{}
		for range 3 {
			s, m, err := ls.Open(ctx, channels.Header{})
			require.NoError(t, err)
			require.NotContains(t, open, m.IID, "each idle member gets one stream")
			open[m.IID] = s
		}
		assert.Equal(t, map[string]int{"s1": 1, "s2": 1, "s3": 1}, channels.ActiveStreams(ls))
		// Free s2's stream: the next one must go to s2.
		require.NoError(t, open["s2"].Close())
		require.Equal(t, map[string]int{"s1": 1, "s3": 1}, channels.ActiveStreams(ls))
		s, m, err := ls.Open(ctx, channels.Header{})
		require.NoError(t, err)
		assert.Equal(t, "s2", m.IID)
		require.NoError(t, s.Close())
		require.NoError(t, open["s1"].Close())
		require.NoError(t, open["s3"].Close())
		assert.Empty(t, channels.ActiveStreams(ls))
	})

	// Drain what the servers accepted so nothing is left behind.
	for _, r := range replies {
		for {
			ctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			in, err := r.Accept(ctx)
			cancel()
			if err != nil {
				break
			}
			in.Stream.Close()
		}
	}
}

func TestFailoverToAnotherMember(t *testing.T) {
	tr := channels.NewMemoryTransport()
	var reply channels.ReplyChannel
	up := startNode(t, baseConfig("up", tr, dialers("c")), func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	svc := map[string]uint16{"svc": 80}
	src := membership.Static(
		channels.Member{IID: "down", Addr: "127.0.0.1:9", Channels: svc}, // nobody listens
		member(up, "up", svc),
	)
	var req channels.RequestChannel
	startNode(t, baseConfig("c", tr, src), func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	for range 4 {
		s, m, err := req.Open(context.Background(), channels.Header{})
		require.NoError(t, err)
		require.Equal(t, "up", m.IID)
		s.Close()
		in, err := reply.Accept(context.Background())
		require.NoError(t, err)
		in.Stream.Close()
	}
}

func TestDuplex(t *testing.T) {
	tr := channels.NewMemoryTransport()
	src := membership.NewDynamic()
	duplex := map[string]channels.DuplexChannel{}
	nodes := map[string]*channels.Node{}
	for _, iid := range []string{"n2", "n1", "n3"} {
		nodes[iid] = startNode(t, baseConfig(iid, tr, src), func(n *channels.Node) {
			d, err := n.Duplex("peers")
			require.NoError(t, err)
			duplex[iid] = d
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	watch := duplex["n1"].Watch(ctx)
	require.Empty(t, <-watch, "the initial, empty membership")

	peers := map[string]uint16{"peers": 2380}
	all := []channels.Member{member(nodes["n1"], "n1", peers), member(nodes["n2"], "n2", peers), member(nodes["n3"], "n3", peers)}
	src.Set(all...)
	iids := func(ms []channels.Member) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.IID)
		}
		return out
	}
	require.Equal(t, []string{"n2", "n3"}, iids(<-watch), "sorted, without the local instance")

	// n1 -> n2, then n2 -> n1 over the session n1 dialed.
	s, err := duplex["n1"].Open(ctx, "n2", channels.Header{SourcePort: 5, TargetPort: 2380})
	require.NoError(t, err)
	in, err := duplex["n2"].Accept(ctx)
	require.NoError(t, err)
	assert.Equal(t, "n1", in.Peer.IID)
	assert.Equal(t, "peers", in.Header.Channel)
	s.Close()
	in.Stream.Close()
	// n2 learns of the membership on its own: wait until it has n1.
	for ms := range duplex["n2"].Watch(ctx) {
		if slices.Contains(iids(ms), "n1") {
			break
		}
	}
	s, err = duplex["n2"].Open(ctx, "n1", channels.Header{})
	require.NoError(t, err)
	in, err = duplex["n1"].Accept(ctx)
	require.NoError(t, err)
	assert.Equal(t, "n2", in.Peer.IID)
	s.Close()
	in.Stream.Close()
	// The incoming sessions are reused for outgoing streams: n2 dials
	// none, and the pair has the SessionsPerPeer that n1 dialed.
	require.Eventually(t, func() bool {
		return nodes["n1"].NumSessions("n2") == channels.DefaultSessionsPerPeer &&
			nodes["n2"].NumSessions("n1") == channels.DefaultSessionsPerPeer
	}, 5*time.Second, 10*time.Millisecond)

	_, err = duplex["n1"].Open(ctx, "nobody", channels.Header{})
	require.ErrorIs(t, err, channels.ErrNoMembers)
	_, err = duplex["n1"].Open(ctx, "n1", channels.Header{})
	require.Error(t, err)

	// n3 leaves.
	src.Set(all[:2]...)
	require.Equal(t, []string{"n2"}, iids(<-watch))
	// A change that does not touch the channel is not published: the next
	// value seen is the one after the following relevant change.
	src.Set(append(all[:2:2], channels.Member{IID: "z", Addr: "x:1", Channels: map[string]uint16{"other": 1}})...)
	src.Set(all...)
	require.Equal(t, []string{"n2", "n3"}, iids(<-watch))

	cancel()
	_, ok := <-watch
	require.False(t, ok, "Watch's channel closes with its context")
}

func TestCloseEndsEverything(t *testing.T) {
	tr := channels.NewMemoryTransport()
	n, err := channels.NewNode(baseConfig("a", tr, membership.Static()))
	require.NoError(t, err)
	reply, err := n.Reply("r")
	require.NoError(t, err)
	duplex, err := n.Duplex("d")
	require.NoError(t, err)
	req, err := n.Request("q", "", nil)
	require.NoError(t, err)
	require.NoError(t, n.Start(context.Background()))
	watch := duplex.Watch(context.Background())
	<-watch

	acceptErr := make(chan error, 1)
	go func() {
		_, err := reply.Accept(context.Background())
		acceptErr <- err
	}()
	require.NoError(t, n.Close())
	require.NoError(t, n.Close(), "Close is idempotent")
	require.ErrorIs(t, <-acceptErr, channels.ErrClosed)
	_, err = duplex.Accept(context.Background())
	require.ErrorIs(t, err, channels.ErrClosed)
	_, _, err = req.Open(context.Background(), channels.Header{})
	require.ErrorIs(t, err, channels.ErrClosed)
	_, ok := <-watch
	require.False(t, ok)
	_, ok = <-duplex.Watch(context.Background())
	require.False(t, ok)
	require.ErrorIs(t, n.Start(context.Background()), channels.ErrClosed)
}

func TestAcceptBacklogFull(t *testing.T) {
	const wait = 100 * time.Millisecond
	req, _, _, _ := pair(t, channels.NewMemoryTransport(), func(c *channels.Config) {
		c.AcceptBacklog = 1
		c.HandshakeTimeout = wait
	})
	ctx := context.Background()
	results := make(chan error, 2)
	start := time.Now()
	for range 2 {
		s, _, err := req.Open(ctx, channels.Header{})
		require.NoError(t, err)
		defer s.Close()
		go func() {
			_, err := s.Read(make([]byte, 1)) // the queued stream blocks until Close
			results <- err
		}()
	}
	// Nobody accepts: the stream that finds the queue full waits for room
	// for HandshakeTimeout, and is reset then.
	require.ErrorIs(t, <-results, channels.ErrStreamReset)
	require.GreaterOrEqual(t, time.Since(start), wait)
}

func TestTLSRejectsUnknownCA(t *testing.T) {
	caGood, good := writeCerts(t, t.TempDir(), "b")
	caBad, bad := writeCerts(t, t.TempDir(), "a")
	tlsB, err := channels.TLSConfigFromFiles(good["b"][0], good["b"][1], caGood)
	require.NoError(t, err)
	tlsA, err := channels.TLSConfigFromFiles(bad["a"][0], bad["a"][1], caBad)
	require.NoError(t, err)
	_, err = channels.TLSConfigFromFiles(bad["a"][0], bad["a"][1], bad["a"][0]+".missing")
	require.Error(t, err)

	req, _, _, _ := pair(t, nil, func(c *channels.Config) {
		if c.IID == "a" {
			c.TLS = tlsA
		} else {
			c.TLS = tlsB
		}
	})
	_, _, err = req.Open(context.Background(), channels.Header{})
	require.Error(t, err)
	require.ErrorContains(t, err, "tls")
	require.True(t, errors.Is(err, channels.ErrNoMembers))
}

// With SessionsPerPeer 2, the first session is followed by a second, and new
// streams go to the session carrying fewer: two sessions, never three,
// evenly loaded. (Over TCP, whose sessions have distinct local addresses;
// a Unix socket's dialing end has none.)
func TestSessionsPerPeer(t *testing.T) {
	req, reply, _, _ := pair(t, channels.PlainTCPTransport(), func(c *channels.Config) { c.SessionsPerPeer = 2 })
	perSession := map[string]int{}
	hold := func() {
		s, in := open(t, req, reply)
		t.Cleanup(func() {
			s.Close()
			in.Stream.Close()
		})
		perSession[s.LocalAddr().String()]++
	}
	hold()
	// The second session comes up in the background; meanwhile streams
	// go to the first.
	require.Eventually(t, func() bool {
		hold()
		return len(perSession) == 2
	}, 5*time.Second, time.Millisecond)
	// Enough streams to even out what the first session took alone.
	var counts []int
	for _, n := range perSession {
		counts = append(counts, n)
	}
	for range max(counts[0], counts[1]) - min(counts[0], counts[1]) + 10 {
		hold()
	}
	require.Len(t, perSession, 2, "sessions used")
	counts = counts[:0]
	for _, n := range perSession {
		counts = append(counts, n)
	}
	assert.LessOrEqual(t, max(counts[0], counts[1])-min(counts[0], counts[1]), 1, "streams per session: %v", perSession)
}
