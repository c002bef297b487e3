package channels_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

// TestMemberRemovalClosesSessions: a member that leaves the membership
// loses its sessions, on the node it dialed and on the node it serves,
// with its streams reset; it gets nothing through until it is back.
func TestMemberRemovalClosesSessions(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	tr := channels.NewMemoryTransport()
	bMembers := membership.NewDynamic(channels.Member{IID: "a", Role: "test"})
	var reply channels.ReplyChannel
	b := startNode(t, baseConfig("b", tr, bMembers), func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	bEntry := member(b, "b", map[string]uint16{"svc": 80})
	aMembers := membership.NewDynamic(bEntry)
	var req channels.RequestChannel
	acfg := baseConfig("a", tr, aMembers)
	// No second session dialed in the background, which could complete
	// its handshake just before the removal and be closed just after.
	acfg.SessionsPerPeer = 1
	a := startNode(t, acfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	ctx := context.Background()

	t.Run("the dialer leaves the server's membership", func(t *testing.T) {
		s, in := open(t, req, reply)
		bMembers.Set() // a leaves
		_, err := io.ReadAll(s)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		_, err = io.ReadAll(in.Stream)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		sessionsGone(t, a, "b")
		sessionsGone(t, b, "a")
		_, _, err = req.Open(ctx, channels.Header{})
		require.ErrorContains(t, err, `instance "a" (role "test") is not a member`)

		bMembers.Set(channels.Member{IID: "a", Role: "test"}) // back
		openEventually(t, req, reply)
	})

	t.Run("the server leaves the dialer's membership", func(t *testing.T) {
		s, in := open(t, req, reply)
		aMembers.Set()
		_, err := io.ReadAll(s)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		_, err = io.ReadAll(in.Stream)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		sessionsGone(t, a, "b")
		sessionsGone(t, b, "a")
	})

	t.Run("a changed role is a new identity", func(t *testing.T) {
		aMembers.Set(bEntry)
		openEventually(t, req, reply)
		s, in := open(t, req, reply)
		changed := bEntry
		changed.Role = "other"
		aMembers.Set(changed)
		_, err := io.ReadAll(s)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		in.Stream.Close()
		sessionsGone(t, a, "b")
		// b still says role "test": a refuses to keep the session. (A
		// dial that began before the change may fail first.)
		require.Eventually(t, func() bool {
			_, _, err = req.Open(ctx, channels.Header{})
			return err != nil && strings.Contains(err.Error(), `to have role "other" but it says "test"`)
		}, 5*time.Second, 5*time.Millisecond, "last error: %v", err)
	})
}

// openEventually waits until a stream opened on req reaches reply.
func openEventually(t *testing.T, req channels.RequestChannel, reply channels.ReplyChannel) {
	t.Helper()
	ctx := context.Background()
	require.Eventually(t, func() bool {
		s, _, err := req.Open(ctx, channels.Header{})
		if err == nil {
			s.Close()
		}
		return err == nil
	}, 5*time.Second, 10*time.Millisecond)
	in, err := reply.Accept(ctx)
	require.NoError(t, err)
	in.Stream.Close()
}

// echo answers every stream accepted on d with its bytes, until d's node
// closes.
func echo(t *testing.T, d channels.DuplexChannel, wg *sync.WaitGroup) {
	wg.Go(func() {
		for {
			in, err := d.Accept(context.Background())
			if err != nil {
				return
			}
			wg.Go(func() {
				defer in.Stream.Close()
				if _, err := io.Copy(in.Stream, in.Stream); err != nil {
					t.Errorf("echo: %v", err)
					return
				}
				if err := in.Stream.CloseWrite(); err != nil {
					t.Errorf("echo: close write: %v", err)
				}
			})
		}
	})
}

// TestMaxSessionAgeRotatesWithoutLoss runs streams both ways between two
// duplex members whose sessions live 100ms: sessions are replaced many
// times over, and no stream fails, including one that lives across every
// replacement, whose session stays until it ends.
func TestMaxSessionAgeRotatesWithoutLoss(t *testing.T) {
	for _, tc := range []struct {
		name string
		tr   func() channels.Transport
	}{
		{"memory", func() channels.Transport { return channels.NewMemoryTransport() }},
		{"tcp", channels.PlainTCPTransport},
	} {
		t.Run(tc.name, func(t *testing.T) { testMaxSessionAge(t, tc.tr()) })
	}
}

func testMaxSessionAge(t *testing.T, tr channels.Transport) {
	src := membership.NewDynamic()
	var handshakes atomic.Int64
	nodes := map[string]*channels.Node{}
	duplex := map[string]channels.DuplexChannel{}
	var members []channels.Member
	for _, iid := range []string{"n1", "n2"} {
		cfg := baseConfig(iid, tr, src)
		cfg.MaxSessionAge = 100 * time.Millisecond
		cfg.SessionsPerPeer = 1
		cfg.OnHandshake = func(_ string, dialed bool, _ time.Duration, err error) {
			if dialed && err == nil {
				handshakes.Add(1)
			}
		}
		nodes[iid] = startNode(t, cfg, func(n *channels.Node) {
			d, err := n.Duplex("ring")
			require.NoError(t, err)
			duplex[iid] = d
		})
		members = append(members, member(nodes[iid], iid, map[string]uint16{"ring": 1}))
	}
	var echoes sync.WaitGroup
	// Runs before the nodes' own cleanups: the echoes end once the nodes
	// are closed.
	t.Cleanup(func() {
		for _, n := range nodes {
			n.Close()
		}
		echoes.Wait()
	})
	for _, d := range duplex {
		echo(t, d, &echoes)
	}
	src.Set(members...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for iid, d := range duplex {
		for view := range d.Watch(ctx) {
			if len(view) == 1 {
				break
			}
		}
		require.NoError(t, ctx.Err(), "%s never saw the other member", iid)
	}

	// A stream that lives across the replacements.
	long, err := duplex["n1"].Open(ctx, "n2", channels.Header{SourcePort: 1})
	require.NoError(t, err)
	ping := func() {
		_, err := long.Write([]byte("ping"))
		require.NoError(t, err)
		buf := make([]byte, 4)
		_, err = io.ReadFull(long, buf)
		require.NoError(t, err)
		require.Equal(t, "ping", string(buf))
	}
	ping()

	// Short streams both ways until sessions were replaced ten times.
	var (
		wg     sync.WaitGroup
		failed atomic.Int64
		done   atomic.Int64
	)
	start := handshakes.Load()
	for from, to := range map[string]string{"n1": "n2", "n2": "n1"} {
		for w := range 3 {
			wg.Go(func() {
				payload := bytes.Repeat([]byte{byte(w), byte(len(from))}, 20000)
				for i := 0; handshakes.Load() < start+10 && ctx.Err() == nil; i++ {
					s, err := duplex[from].Open(ctx, to, channels.Header{SourcePort: uint16(i)})
					if err == nil {
						// echo sends it back
						err = exchange(s, payload, sha256.Sum256(payload))
						s.Close()
					}
					if err != nil {
						failed.Add(1)
						t.Errorf("%s -> %s, stream %d: %v", from, to, i, err)
						return
					}
					done.Add(1)
				}
			})
		}
	}
	wg.Wait()
	require.NoError(t, ctx.Err(), "sessions were not replaced 10 times")
	require.Zero(t, failed.Load())
	t.Logf("%d streams over %d session handshakes", done.Load(), handshakes.Load()-start)

	// The long stream still works; its session is retiring, not closed.
	ping()
	require.Positive(t, nodes["n1"].Retiring("n2"), "the long stream's session")
	var retiring int
	for _, s := range nodes["n1"].Status().Sessions {
		if s.Retiring {
			retiring++
			assert.Contains(t, []string{"dialed", "same-host"}, s.Auth, "sessions without TLS on one host")
		}
	}
	require.Positive(t, retiring, "Status shows the retiring session")
	require.NoError(t, long.CloseWrite())
	_, err = io.ReadAll(long)
	require.NoError(t, err)
	require.NoError(t, long.Close())
	// Then it closes.
	require.Eventually(t, func() bool { return nodes["n1"].Retiring("n2") == 0 }, 10*time.Second, 5*time.Millisecond)
}
