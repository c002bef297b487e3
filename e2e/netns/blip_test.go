//go:build linux

package netns

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
)

// TestSessionSurvivesLinkBlip: a session between two hosts carries a bulk
// stream while the link goes down for over 2s and comes back. TCP's
// retransmission timeout has backed off meanwhile (0.2s, 0.4s, ... 3.2s),
// so nothing moves for longer than the session's write timeout (1s here,
// 10s by default, for RTTs and blips scaled alike) although the link is
// back; the session waits for TCP to recover instead of resetting every
// stream, and every byte arrives. (Before, the write timeout ended it.)
func TestSessionSurvivesLinkBlip(t *testing.T) {
	requireNamespaces(t)
	n, b, cli, srv := blipSessions(t, "10.215.0.0/24")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	up, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	// The sender writes until told to stop, hashing what it sent; the
	// receiver hashes what it got.
	stop := make(chan struct{})
	type result struct {
		n   int64
		sum []byte
		err error
	}
	sent := make(chan result, 1)
	go func() {
		h := sha256.New()
		chunk := make([]byte, 256<<10)
		var n int64
		for {
			select {
			case <-stop:
				sent <- result{n, h.Sum(nil), up.CloseWrite()}
				return
			default:
			}
			_, _ = rand.Read(chunk)
			if _, err := up.Write(chunk); err != nil {
				sent <- result{n, nil, err}
				return
			}
			h.Write(chunk)
			n += int64(len(chunk))
		}
	}()
	down, err := srv.AcceptStream(ctx)
	require.NoError(t, err)
	received := make(chan result, 1)
	go func() {
		h := sha256.New()
		n, err := io.Copy(h, down)
		received <- result{n, h.Sum(nil), err}
	}()

	require.Eventually(t, func() bool { return cli.RTT() > 0 && cli.Stats().BytesSent > 16<<20 }, 30*time.Second, time.Millisecond, "the transfer never got going")
	require.NoError(t, n.LinkDown(b))
	// The outage lasts until the session's write has waited twice its
	// timeout, which alone would have ended it.
	require.Eventually(t, func() bool { return cli.Stalled() >= 2*time.Second || cli.IsClosed() }, 20*time.Second, time.Millisecond)
	require.False(t, cli.IsClosed(), "session ended during the outage: %v", cli.Err())
	require.NoError(t, n.LinkUp(b))
	before := cli.Stats().BytesSent
	require.Eventually(t, func() bool { return cli.Stats().BytesSent > before+4<<20 || cli.IsClosed() }, 30*time.Second, time.Millisecond)
	close(stop)

	var s, r result
	select {
	case s = <-sent:
	case <-ctx.Done():
		require.FailNow(t, "the sender did not finish")
	}
	require.NoError(t, s.err, "the stream failed across the blip: session %v", cli.Err())
	select {
	case r = <-received:
	case <-ctx.Done():
		require.FailNow(t, "the receiver did not finish")
	}
	require.NoError(t, r.err)
	require.Equal(t, s.n, r.n)
	require.Equal(t, s.sum, r.sum, "the data arrived altered")
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
	t.Logf("%d MiB across a link blip; the write deadline was moved on %d times while TCP recovered", s.n>>20, cli.LimitStats().LossWaits)
}

// TestStalledWithoutWaitingWrite: data that fit in the socket's buffer
// stalls too when the link goes down: no write waits, but TCP retransmits
// after a timeout and hears nothing, and the session says it is Stalled
// (so that new streams avoid it), until the link is back.
func TestStalledWithoutWaitingWrite(t *testing.T) {
	requireNamespaces(t)
	n, b, cli, srv := blipSessions(t, "10.216.0.0/24")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, peer := helloStream(ctx, t, cli, srv)

	require.NoError(t, n.LinkDown(b))
	_, err := st.Write(make([]byte, 4<<10)) // fits in the socket buffer
	require.NoError(t, err)
	require.Eventually(t, func() bool { return cli.Stalled() >= time.Second }, 20*time.Second, time.Millisecond)
	require.NoError(t, n.LinkUp(b))
	_, err = io.ReadFull(peer, make([]byte, 4<<10))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return cli.Stalled() == 0 }, 20*time.Second, time.Millisecond)
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
}

// blipSessions returns a mux session pair between two hosts of a new
// network (subnet) whose first host's uplink is 50 Mbit/s with 5ms of
// delay: the client on the first host, the server on the second (b).
func blipSessions(t *testing.T, subnet string) (n *ns.Net, b *ns.Host, cli, srv *mux.Session) {
	// Pings every second measure the RTT, which lets the stream's window
	// grow past what the link holds; one unanswered for 20s would end
	// the session.
	return blipSessionsWith(t, subnet, mux.Config{WriteTimeout: time.Second, KeepAliveInterval: time.Second, KeepAliveTimeout: 20 * time.Second})
}

// blipSessionsWith is blipSessions with the sessions' configuration.
func blipSessionsWith(t *testing.T, subnet string, cfg mux.Config) (n *ns.Net, b *ns.Host, cli, srv *mux.Session) {
	n, err := ns.NewNet(ns.RandomPrefix(), 2, netip.MustParsePrefix(subnet))
	require.NoError(t, err)
	t.Cleanup(func() { _ = n.Delete() })
	a, b := n.Hosts[0], n.Hosts[1]
	// The link, not the stream's window, limits a bulk transfer, so the
	// sender waits on its socket.
	imp, err := a.Impair(ns.Impairment{Rate: 50e6, Delay: 5 * time.Millisecond}, n.Subnet.String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = imp.Stop() })

	ln, err := b.Listen(netip.AddrPortFrom(b.Addr, 7000).String())
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c1, err := a.Dial(netip.AddrPortFrom(b.Addr, 7000).String(), 5*time.Second)
	require.NoError(t, err)
	c2 := <-accepted
	require.NotNil(t, c2)
	cli, err = mux.Client(c1, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { cli.Close() })
	srv, err = mux.Server(c2, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { srv.Close() })
	return n, b, cli, srv
}

// TestSessionResumesSoonAfterOutage: a message sent while the link is
// down for 30s arrives within a few seconds of the link's return, and the
// session lives on. Left to itself, TCP doubles its retransmission timeout
// after every try that goes unanswered, and would send the message again
// only about 20s after the link is back, holding every stream of the
// session meanwhile; the session caps the timeout (2s on this link) where
// the kernel allows it (Linux 6.15 and later). The cap would also make the
// kernel give up on the connection after 27s of retransmissions instead
// of about 15 minutes, so the session sets that time back.
func TestSessionResumesSoonAfterOutage(t *testing.T) {
	requireNamespaces(t)
	if !canCapRetransmitTimeout(t) {
		t.Skip("this kernel cannot cap TCP's retransmission timeout (TCP_RTO_MAX_MS needs Linux 6.15)")
	}
	// Keepalive off: the message is the only data in flight, and its
	// delay TCP's alone.
	n, b, cli, srv := blipSessionsWith(t, "10.217.0.0/24", mux.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, peer := helloStream(ctx, t, cli, srv)

	require.NoError(t, n.LinkDown(b))
	msg := []byte("sent during the outage")
	_, err := st.Write(msg) // fits in the socket buffer
	require.NoError(t, err)
	// Uncapped, the retransmissions would go at about 0.2s, 0.6s, 1.4s,
	// 3s, 6.2s, 12.6s, 25.4s and 51s into the outage (RTO 0.2s on this
	// link), and the link comes back in the last gap; capped, every 2s
	// from 3s on.
	require.Eventually(t, func() bool { return cli.Stalled() >= 30*time.Second || cli.IsClosed() }, time.Minute, 10*time.Millisecond)
	require.False(t, cli.IsClosed(), "session ended during the outage: %v", cli.Err())
	require.NoError(t, n.LinkUp(b))
	up := time.Now()
	got := make([]byte, len(msg))
	require.NoError(t, peer.SetReadDeadline(up.Add(30*time.Second)))
	_, err = io.ReadFull(peer, got)
	require.NoError(t, err, "session: %v", cli.Err())
	wait := time.Since(up)
	require.Equal(t, msg, got)
	require.Less(t, wait, 5*time.Second, "the message arrived %v after the link came back", wait)
	require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
	t.Logf("the message arrived %v after the link came back", wait.Round(time.Millisecond))
}

// canCapRetransmitTimeout reports whether this kernel takes TCP_RTO_MAX_MS.
func canCapRetransmitTimeout(t *testing.T) bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	require.NoError(t, err)
	defer unix.Close(fd)
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_RTO_MAX_MS, 2000) == nil
}

// helloStream opens a stream from cli to srv and sees its first bytes
// arrive.
func helloStream(ctx context.Context, t *testing.T, cli, srv *mux.Session) (st, peer *mux.Stream) {
	t.Helper()
	st, err := cli.OpenStream(ctx)
	require.NoError(t, err)
	_, err = st.Write([]byte("hello"))
	require.NoError(t, err)
	peer, err = srv.AcceptStream(ctx)
	require.NoError(t, err)
	_, err = io.ReadFull(peer, make([]byte, 5))
	require.NoError(t, err)
	return st, peer
}
