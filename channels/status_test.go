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
)

// TestNodeStatus: a client node with a request channel whose members are
// a reachable server over mutual TLS and an address nobody listens on.
// Its status shows the server up with one session carrying the bytes sent,
// the TLS identity and a measured RTT, and the dead member backing off
// with the dial error; the server's shows the accepted session.
func TestNodeStatus(t *testing.T) {
	caFile, files := writeCerts(t, t.TempDir(), "a", "b")
	withTLS := func(c *channels.Config) {
		var err error
		c.TLS, err = channels.TLSConfigFromFiles(files[c.IID][0], files[c.IID][1], caFile)
		require.NoError(t, err)
		c.SessionsPerPeer = 1
		c.KeepAliveInterval = 50 * time.Millisecond // RTT measured soon
	}
	var reply channels.ReplyChannel
	cb := baseConfig("b", channels.PlainTCPTransport(), nil)
	withTLS(&cb)
	b := startNode(t, cb, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	deadAddr := dead.Addr().String()
	dead.Close()
	ca := baseConfig("a", channels.PlainTCPTransport(), membership.Static(
		member(b, "b", map[string]uint16{"svc": 80}),
		channels.Member{IID: "c", Role: "test", Addr: deadAddr, Channels: map[string]uint16{"svc": 80}},
		channels.Member{IID: "a", Role: "test", Addr: "127.0.0.1:1", Channels: map[string]uint16{"peers": 1}},
	))
	ca.ListenAddr = ""
	ca.BackoffMin, ca.BackoffMax = time.Minute, time.Minute // c stays in backoff
	withTLS(&ca)
	var req channels.RequestChannel
	a := startNode(t, ca, func(n *channels.Node) {
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
		_, err = n.Duplex("peers")
		require.NoError(t, err)
	})

	// Before any stream: nobody is dialed.
	st := a.Status()
	require.Len(t, st.Members, 3)
	assert.Equal(t, []string{channels.MemberSelf, channels.MemberIdle, channels.MemberIdle},
		[]string{st.Members[0].State, st.Members[1].State, st.Members[2].State})
	assert.Empty(t, st.Sessions)

	// Two streams: round robin tries both members, and c's dial fails
	// over to b.
	payload := []byte("twelve bytes")
	for range 2 {
		s, in := open(t, req, reply)
		_, err := s.Write(payload)
		require.NoError(t, err)
		require.NoError(t, s.CloseWrite())
		got, err := io.ReadAll(in.Stream)
		require.NoError(t, err)
		require.Equal(t, payload, got)
		require.NoError(t, in.Stream.Close())
		require.NoError(t, s.Close())
	}

	require.EventuallyWithT(t, func(c *assert.CollectT) {
		st := a.Status()
		assert.Equal(c, "a", st.IID)
		assert.True(c, st.TLS)
		assert.Empty(c, st.Addr, "a does not listen")
		if !assert.Len(c, st.Members, 3) || !assert.Len(c, st.Sessions, 1) {
			return
		}
		mb, mc := st.Members[1], st.Members[2]
		assert.Equal(c, "b", mb.IID)
		assert.Equal(c, channels.MemberUp, mb.State)
		assert.Equal(c, 1, mb.Sessions)
		assert.Equal(c, "c", mc.IID)
		assert.Equal(c, channels.MemberBackoff, mc.State)
		assert.Equal(c, 1, mc.Failures)
		assert.Contains(c, mc.LastError, deadAddr)
		assert.True(c, mc.RetryAt.After(time.Now()))

		s := st.Sessions[0]
		assert.Equal(c, "b", s.Peer)
		assert.Equal(c, "tcp", s.Net)
		assert.True(c, s.Dialed)
		assert.Equal(c, "tcpproxy://instance/b?role=test", s.Identity)
		assert.Equal(c, b.Addr(), s.RemoteAddr)
		assert.Positive(c, s.RTT)
		assert.WithinDuration(c, time.Now(), s.Established, time.Minute)
		// Each stream carries its header and the payload.
		assert.Greater(c, s.BytesSent, uint64(2*len(payload)))
		assert.Equal(c, uint64(0), s.BytesReceived)

		assert.Equal(c, []channels.ChannelStatus{
			{Name: "peers", Kind: "duplex", Members: []string{}},
			{Name: "svc", Kind: "request", Target: "svc", Members: []string{"b", "c"}},
		}, st.Channels)

		sb := b.Status()
		assert.Equal(c, b.Addr(), sb.Addr)
		if assert.Len(c, sb.Sessions, 1) {
			in := sb.Sessions[0]
			assert.Equal(c, "a", in.Peer)
			assert.False(c, in.Dialed)
			assert.Equal(c, "tcpproxy://instance/a?role=test", in.Identity)
			assert.Equal(c, s.BytesSent, in.BytesReceived)
			assert.Equal(c, 0, in.Streams)
		}
		assert.Equal(c, []channels.ChannelStatus{{Name: "svc", Kind: "reply"}}, sb.Channels)
	}, 10*time.Second, 5*time.Millisecond)
}

// A node's status lists the members it knows with how it reaches them,
// and its live sessions.
func ExampleNode_Status() {
	tr := channels.NewMemoryTransport()
	quiet := slog.New(slog.DiscardHandler)
	server, _ := channels.NewNode(channels.Config{IID: "db-1", Role: "db", ListenAddr: "db-1:7000", Transport: tr, Logger: quiet})
	reply, _ := server.Reply("sql")
	client, _ := channels.NewNode(channels.Config{IID: "web-1", Role: "web", Transport: tr, Logger: quiet, SessionsPerPeer: 1, Members: membership.Static(
		channels.Member{IID: "db-1", Role: "db", Addr: "db-1:7000", Channels: map[string]uint16{"sql": 5432}},
	)})
	req, _ := client.Request("sql", "", nil)
	ctx := context.Background()
	_ = server.Start(ctx)
	_ = client.Start(ctx)
	defer server.Close()
	defer client.Close()

	s, _, err := req.Open(ctx, channels.Header{TargetPort: 5432})
	if err != nil {
		fmt.Println(err)
		return
	}
	in, _ := reply.Accept(ctx)
	st := client.Status()
	for _, m := range st.Members {
		fmt.Println("member", m.IID, m.Addr, m.State)
	}
	for _, ss := range st.Sessions {
		fmt.Println("session", ss.Peer, ss.Net, "dialed:", ss.Dialed, "streams:", ss.Streams)
	}
	s.Close()
	in.Stream.Close()
	// Output:
	// member db-1 db-1:7000 up
	// session db-1 memory dialed: true streams: 1
}
