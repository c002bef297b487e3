package channels_test

import (
	"context"
	"io"
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

// failedDial is a dial that failed, as Config.OnHandshake reports it.
type failedDial struct {
	peer string
	err  error
}

// reportDials makes the node of cfg count its dials and send the first
// 100 that fail on the channel returned.
func reportDials(cfg *channels.Config) (dials *atomic.Int64, failed <-chan failedDial) {
	dials = new(atomic.Int64)
	ch := make(chan failedDial, 100)
	cfg.OnHandshake = func(peer string, dialed bool, _ time.Duration, err error) {
		if !dialed {
			return
		}
		dials.Add(1)
		if err != nil {
			select {
			case ch <- failedDial{peer, err}:
			default:
			}
		}
	}
	return dials, ch
}

// opened is the outcome of an Open run in the background.
type opened struct {
	s   channels.Stream
	m   channels.Member
	err error
}

// openInBackground runs open in a goroutine and delivers its outcome.
func openInBackground(open func() (channels.Stream, channels.Member, error)) <-chan opened {
	done := make(chan opened, 1)
	go func() {
		s, m, err := open()
		done <- opened{s, m, err}
	}()
	return done
}

// unusedAddr returns an address of tr where nothing listens (until a
// node is started there).
func unusedAddr(t *testing.T, tr channels.Transport) string {
	t.Helper()
	ln, err := tr.Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

// startRequester starts a node with cfg and a request channel "svc"
// balanced by b.
func startRequester(t *testing.T, cfg channels.Config, b channels.Balancer) channels.RequestChannel {
	t.Helper()
	var req channels.RequestChannel
	startNode(t, cfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", b)
		require.NoError(t, err)
	})
	return req
}

// carries writes msg on s, ends it, and checks that in reads exactly msg.
func carries(t *testing.T, s channels.Stream, in io.Reader, msg string) {
	t.Helper()
	_, err := s.Write([]byte(msg))
	require.NoError(t, err)
	require.NoError(t, s.CloseWrite())
	got, err := io.ReadAll(in)
	require.NoError(t, err)
	require.Equal(t, msg, string(got))
}

// TestOpenWaitsForRestartingPeer opens a stream to the only member while
// its node is down, as a legacy connection arrives while the peer's proxy
// restarts: the Open dials again as the backoff allows and gets its stream
// once the peer is back, instead of failing with the first dial.
func TestOpenWaitsForRestartingPeer(t *testing.T) {
	tr := channels.NewMemoryTransport()
	addr := unusedAddr(t, tr)
	cfg := baseConfig("a", tr, membership.Static(channels.Member{IID: "b", Addr: addr, Channels: map[string]uint16{"svc": 80}}))
	_, failed := reportDials(&cfg)
	req := startRequester(t, cfg, channels.LeastStreams())

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := openInBackground(func() (channels.Stream, channels.Member, error) {
		return req.Open(ctx, channels.Header{SourcePort: 7, TargetPort: 80})
	})
	select {
	case f := <-failed:
		require.ErrorIs(t, f.err, syscall.ECONNREFUSED, "the first dial finds nothing listening")
	case o := <-done:
		require.Failf(t, "Open returned before its first dial failed", "err: %v", o.err)
	}

	bcfg := baseConfig("b", tr, dialers("a"))
	bcfg.ListenAddr = addr
	var reply channels.ReplyChannel
	startNode(t, bcfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	o := <-done
	require.NoError(t, o.err, "the Open waited for the peer to come back")
	defer o.s.Close()
	in, err := reply.Accept(ctx)
	require.NoError(t, err)
	defer in.Stream.Close()
	carries(t, o.s, in.Stream, "after the restart")
}

// TestOpenWaitsForAnyMember: with two members down, an Open waits for
// whichever comes back first, not for the one it happened to try last.
func TestOpenWaitsForAnyMember(t *testing.T) {
	tr := channels.NewMemoryTransport()
	addrs := map[string]string{"b": unusedAddr(t, tr), "c": unusedAddr(t, tr)}
	cfg := baseConfig("a", tr, membership.Static(
		channels.Member{IID: "b", Addr: addrs["b"], Channels: map[string]uint16{"svc": 80}},
		channels.Member{IID: "c", Addr: addrs["c"], Channels: map[string]uint16{"svc": 80}}))
	_, failed := reportDials(&cfg)
	req := startRequester(t, cfg, channels.LeastStreams())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := openInBackground(func() (channels.Stream, channels.Member, error) { return req.Open(ctx, channels.Header{}) })
	down := map[string]bool{}
	for len(down) < 2 {
		select {
		case f := <-failed:
			down[f.peer] = true
		case o := <-done:
			require.Failf(t, "Open returned before both members failed", "err: %v", o.err)
		}
	}
	// Whichever the Open tried last, b is the one that comes back.
	bcfg := baseConfig("b", tr, dialers("a"))
	bcfg.ListenAddr = addrs["b"]
	startNode(t, bcfg, func(n *channels.Node) {
		_, err := n.Reply("svc")
		require.NoError(t, err)
	})
	o := <-done
	require.NoError(t, o.err)
	defer o.s.Close()
	require.Equal(t, "b", o.m.IID)
}

// TestOpenWakesWhenPeerDialsIn: a duplex member that this node cannot
// dial (its address here is stale) but that dials in when it comes back
// carries the waiting Open's stream on its session, before the Open's
// next dial would have failed again.
func TestOpenWakesWhenPeerDialsIn(t *testing.T) {
	tr := channels.NewMemoryTransport()
	peers := map[string]uint16{"peers": 2380}
	acfg := baseConfig("a", tr, membership.Static(channels.Member{IID: "b", Role: "test", Addr: "stale-address", Channels: peers}))
	// The next dial is due 10-20s after the first fails, within the
	// Open's 30s, so the Open waits; the wake-up must come from b's
	// session, long before.
	acfg.BackoffMin, acfg.BackoffMax = 20*time.Second, 20*time.Second
	_, failed := reportDials(&acfg)
	var da channels.DuplexChannel
	a := startNode(t, acfg, func(n *channels.Node) {
		var err error
		da, err = n.Duplex("peers")
		require.NoError(t, err)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := openInBackground(func() (channels.Stream, channels.Member, error) {
		s, err := da.Open(ctx, "b", channels.Header{SourcePort: 9})
		return s, channels.Member{}, err
	})
	require.ErrorIs(t, (<-failed).err, syscall.ECONNREFUSED)

	bcfg := baseConfig("b", tr, membership.Static(member(a, "a", peers)))
	var db channels.DuplexChannel
	startNode(t, bcfg, func(n *channels.Node) {
		var err error
		db, err = n.Duplex("peers")
		require.NoError(t, err)
	})
	sb, err := db.Open(ctx, "a", channels.Header{}) // b dials a
	require.NoError(t, err)
	defer sb.Close()
	var o opened
	select {
	case o = <-done:
	case <-time.After(8 * time.Second):
		require.FailNow(t, "the Open slept on after b's session came up")
	}
	require.NoError(t, o.err, "the Open took the session b dialed")
	defer o.s.Close()
	in, err := db.Accept(ctx)
	require.NoError(t, err)
	defer in.Stream.Close()
	require.Equal(t, uint16(9), in.Header.SourcePort)
	carries(t, o.s, in.Stream, "over b's session")
}

// TestRefusedOpenFailsAtOnce: a refusal does not pass by itself, so an
// Open with nothing else to try fails with it at once, after one dial,
// however long its deadline.
func TestRefusedOpenFailsAtOnce(t *testing.T) {
	tr := channels.NewMemoryTransport()
	c := startNode(t, baseConfig("c", tr, dialers("a")), func(n *channels.Node) {
		_, err := n.Reply("svc")
		require.NoError(t, err)
	})
	cfg := baseConfig("a", tr, membership.Static(channels.Member{IID: "b", Addr: c.Addr(), Channels: map[string]uint16{"svc": 80}}))
	dials, _ := reportDials(&cfg)
	req := startRequester(t, cfg, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, _, err := req.Open(ctx, channels.Header{})
	require.ErrorContains(t, err, `expected instance "b"`)
	require.NoError(t, ctx.Err(), "the Open failed before its deadline")
	require.Equal(t, int64(1), dials.Load())
}

// TestCloseWakesWaitingOpen: closing the node ends an Open that waits to
// dial again.
func TestCloseWakesWaitingOpen(t *testing.T) {
	cfg := baseConfig("a", channels.NewMemoryTransport(), membership.Static(channels.Member{IID: "b", Addr: "nobody-listens", Channels: map[string]uint16{"svc": 80}}))
	cfg.BackoffMin, cfg.BackoffMax = 10*time.Second, 10*time.Second
	_, failed := reportDials(&cfg)
	n, err := channels.NewNode(cfg)
	require.NoError(t, err)
	req, err := n.Request("svc", "", nil)
	require.NoError(t, err)
	require.NoError(t, n.Start(context.Background()))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := openInBackground(func() (channels.Stream, channels.Member, error) { return req.Open(ctx, channels.Header{}) })
	<-failed
	require.NoError(t, n.Close())
	o := <-done
	require.ErrorIs(t, o.err, channels.ErrClosed)
	require.NoError(t, ctx.Err(), "Close ended the Open, not its deadline")
}

// TestConcurrentOpensDuringBackoff: many opens to a peer that cannot be
// reached, each waiting for the next dials until its deadline, share the
// node's dials (one per backoff step, not one per Open), race on nothing
// (run with -race), and all fail with errors by their deadline, never hang.
func TestConcurrentOpensDuringBackoff(t *testing.T) {
	cfg := baseConfig("a", channels.NewMemoryTransport(), membership.Static(channels.Member{IID: "b", Addr: "nobody-listens", Channels: map[string]uint16{"svc": 80}}))
	cfg.BackoffMin, cfg.BackoffMax = 50*time.Millisecond, 5*time.Second
	dials, _ := reportDials(&cfg)
	req := startRequester(t, cfg, nil)
	var wg sync.WaitGroup
	for range 200 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_, _, err := req.Open(ctx, channels.Header{})
			assert.ErrorIs(t, err, channels.ErrNoMembers)
		})
	}
	wg.Wait()
	// Backoff steps of at least 25, 50, 100, 200 and 400ms: within the
	// Opens' second, the first dial and at most six more.
	assert.LessOrEqual(t, dials.Load(), int64(7), "dials for 200 Opens waiting a second each")
	assert.GreaterOrEqual(t, dials.Load(), int64(2), "the Opens dialed again while they waited")
}
