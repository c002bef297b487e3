package channels_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// TestNoStreamsBeforeDialerAnswers: a node opens no stream on a session a
// peer dialed until the peer has answered on it. A dialer whose handshake
// reply comes late (a congested link) gives up and closes the connection,
// and streams opened on it meanwhile would be reset with it.
func TestNoStreamsBeforeDialerAnswers(t *testing.T) {
	tr := channels.NewMemoryTransport()
	peers := map[string]uint16{"peers": 2380}
	// b knows a, which it cannot dial (no address): only a's session
	// can carry b's streams.
	bcfg := baseConfig("b", tr, membership.Static(channels.Member{IID: "a", Role: "test", Channels: peers}))
	// The answer is due within a minute at the latest, after the Opens'
	// deadlines: they wait for it all the same, as it comes within a
	// round trip if at all.
	bcfg.HandshakeTimeout = time.Minute
	var db channels.DuplexChannel
	b := startNode(t, bcfg, func(n *channels.Node) {
		var err error
		db, err = n.Duplex("peers")
		require.NoError(t, err)
	})

	// a does the handshake by hand, reads b's reply, and does not read
	// the session yet: its side is still in its handshake.
	c := rawDial(t, tr, b.Addr())
	require.NoError(t, wire.WriteHello(c, wire.Hello{IID: "a", Role: "test", Channels: []string{"peers"}}))
	rp, err := wire.ReadReply(c)
	require.NoError(t, err)
	require.True(t, rp.Accepted, rp.Reason)
	require.Eventually(t, func() bool { return b.NumSessions("a") == 1 }, 5*time.Second, time.Millisecond)

	quick, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = db.Open(quick, "a", channels.Header{})
	require.ErrorContains(t, err, "has not answered on it yet", "no stream on a session its dialer has not answered on")
	require.ErrorIs(t, err, context.DeadlineExceeded, "the Open waited for the answer until its deadline")

	// a's session starts and answers b's ping: b's waiting Open takes it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := openInBackground(func() (channels.Stream, channels.Member, error) {
		s, err := db.Open(ctx, "a", channels.Header{SourcePort: 4, TargetPort: 2380})
		return s, channels.Member{}, err
	})
	require.NoError(t, c.SetDeadline(time.Time{}))
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	defer sess.Close()
	o := <-done
	require.NoError(t, o.err)
	defer o.s.Close()
	in, err := sess.AcceptStream(ctx)
	require.NoError(t, err)
	defer in.Close()
	h, err := wire.ReadStreamHeader(in)
	require.NoError(t, err)
	require.Equal(t, "peers", h.Channel)
	require.Equal(t, "b", h.SourceIID)
	carries(t, o.s, in, "after the answer")
}
