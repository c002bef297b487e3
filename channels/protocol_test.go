package channels_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// rawDial connects to a node by hand, as a misbehaving or foreign peer would.
func rawDial(t *testing.T, tr channels.Transport, addr string) net.Conn {
	t.Helper()
	c, err := tr.Dial(context.Background(), addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	return c
}

func TestHandshakeRefusals(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	tr := channels.NewMemoryTransport()
	b := startNode(t, baseConfig("b", tr, membership.Static(channels.Member{IID: "x", Role: "r"})), func(n *channels.Node) {
		_, err := n.Reply("svc")
		require.NoError(t, err)
	})
	refuse := func(t *testing.T, h wire.Hello, want string) {
		c := rawDial(t, tr, b.Addr())
		require.NoError(t, wire.WriteHello(c, h))
		rp, err := wire.ReadReply(c)
		require.NoError(t, err)
		require.False(t, rp.Accepted)
		assert.Contains(t, rp.Reason, want)
	}

	t.Run("accepted", func(t *testing.T) {
		c := rawDial(t, tr, b.Addr())
		require.NoError(t, wire.WriteHello(c, wire.Hello{IID: "x", Role: "r"}))
		rp, err := wire.ReadReply(c)
		require.NoError(t, err)
		require.True(t, rp.Accepted)
		assert.Equal(t, wire.Hello{IID: "b", Role: "test", Channels: []string{"svc"}}, rp.Hello)
	})

	t.Run("own iid", func(t *testing.T) {
		refuse(t, wire.Hello{IID: "b"}, `"b" is the listener's own`)
	})

	t.Run("not a member", func(t *testing.T) {
		refuse(t, wire.Hello{IID: "stranger", Role: "r"}, `instance "stranger" (role "r") is not a member`)
	})

	t.Run("not the member's role", func(t *testing.T) {
		refuse(t, wire.Hello{IID: "x", Role: "admin"}, `instance "x" (role "admin"): the member's role is "r"`)
	})

	t.Run("other version", func(t *testing.T) {
		c := rawDial(t, tr, b.Addr())
		body := []byte{1, 'x', 0, 0, 0}
		frame := append(append(wire.Magic[:], wire.Version+1, 1), byte(len(body)>>8), byte(len(body)))
		_, err := c.Write(append(frame, body...))
		require.NoError(t, err)
		rp, err := wire.ReadReply(c)
		require.NoError(t, err)
		require.False(t, rp.Accepted)
		assert.Contains(t, rp.Reason, fmt.Sprintf("protocol version %d not supported", wire.Version+1))
	})

	t.Run("not a tcpproxy peer", func(t *testing.T) {
		c := rawDial(t, tr, b.Addr())
		// Over a pipe the write itself may fail once the node hangs up.
		_, _ = c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
		_, err := c.Read(make([]byte, 1))
		require.Error(t, err, "the node hangs up")
	})
}

// TestBadStreamsAreReset opens hand-made streams on a real session: each
// bad one is reset, and a good one on the same session still works.
func TestBadStreamsAreReset(t *testing.T) {
	tr := channels.NewMemoryTransport()
	var reply channels.ReplyChannel
	cfg := baseConfig("b", tr, membership.Static(channels.Member{IID: "x"}))
	cfg.HandshakeTimeout = 200 * time.Millisecond // for the truncated header
	b := startNode(t, cfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
		_, err = n.Duplex("ring")
		require.NoError(t, err)
	})
	c := rawDial(t, tr, b.Addr())
	require.NoError(t, wire.WriteHello(c, wire.Hello{IID: "x"}))
	rp, err := wire.ReadReply(c)
	require.NoError(t, err)
	require.True(t, rp.Accepted)
	require.NoError(t, c.SetDeadline(time.Time{}))
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	defer sess.Close()

	header := func(h wire.StreamHeader) []byte {
		b, err := wire.AppendStreamHeader(nil, h)
		require.NoError(t, err)
		return b
	}
	ctx := context.Background()
	send := func(first []byte) *mux.Stream {
		st, err := sess.OpenStream(ctx)
		require.NoError(t, err)
		_, err = st.Write(first)
		require.NoError(t, err)
		return st
	}
	good := send(header(wire.StreamHeader{Channel: "svc", SourceIID: "x", SourcePort: 7}))
	for name, first := range map[string][]byte{
		"unknown channel": header(wire.StreamHeader{Channel: "nope", SourceIID: "x"}),
		// x's handshake does not list ring: it is not in the group.
		"duplex channel of another group": header(wire.StreamHeader{Channel: "ring", SourceIID: "x"}),
		"spoofed source":                  header(wire.StreamHeader{Channel: "svc", SourceIID: "b2"}),
		"bad version":                     {9, 3, 's', 'v', 'c'},
		"empty channel":                   {wire.Version, 0},
	} {
		t.Run(name, func(t *testing.T) {
			st := send(first)
			_, err := st.Read(make([]byte, 1))
			require.ErrorIs(t, err, mux.ErrStreamReset)
		})
	}
	t.Run("truncated header times out", func(t *testing.T) {
		st := send([]byte{wire.Version, 3, 's'})
		_, err := st.Read(make([]byte, 1))
		require.ErrorIs(t, err, mux.ErrStreamReset)
	})

	in, err := reply.Accept(ctx)
	require.NoError(t, err)
	require.Equal(t, uint16(7), in.Header.SourcePort)
	_, err = good.Write([]byte("still fine"))
	require.NoError(t, err)
	require.NoError(t, good.CloseWrite())
	got, err := io.ReadAll(in.Stream)
	require.NoError(t, err)
	require.Equal(t, "still fine", string(got))
	require.NoError(t, in.Stream.Close())
}

// TestHandshakeWaitsForNewMember: an instance that dials before the
// membership update listing it reaches the node is accepted once the
// update arrives, within the handshake. (Without the wait, the node
// refuses it in most runs: it looks the member up as soon as it has read
// the hello, before the update.)
func TestHandshakeWaitsForNewMember(t *testing.T) {
	tr := channels.NewMemoryTransport()
	members := membership.NewDynamic()
	b := startNode(t, baseConfig("b", tr, members), func(n *channels.Node) {
		_, err := n.Reply("svc")
		require.NoError(t, err)
	})
	for i := range 20 {
		iid := fmt.Sprintf("new-%d", i)
		c := rawDial(t, tr, b.Addr())
		// Over a pipe, the write returns once b has read the hello.
		require.NoError(t, wire.WriteHello(c, wire.Hello{IID: iid, Role: "r"}))
		members.Set(channels.Member{IID: iid, Role: "r"})
		rp, err := wire.ReadReply(c)
		require.NoError(t, err)
		require.True(t, rp.Accepted, rp.Reason)
	}
}
