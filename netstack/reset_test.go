package netstack_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/tcpproxy/tcpproxy/netstack"
)

// closedCleanly returns the stack's end of a connection that a host
// program and the stack both closed cleanly (the program's FIN after its
// message, then the stack's, acknowledged: CLOSED), with the message
// still unread, after the endpoint recorded a soft error (an ICMP
// unreachable, which a TCP connection outlives) if soft.
func closedCleanly(t *testing.T, msg string, soft bool) *netstack.Conn {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)
	prog, accepted := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	c := accepted.(*netstack.Conn)
	if soft {
		netstack.SetSoftError(c, &tcpip.ErrHostUnreachable{})
	}
	_, err := prog.Write([]byte(msg))
	require.NoError(t, err)
	require.NoError(t, prog.(halfCloser).CloseWrite())
	require.Eventually(t, func() bool { return netstack.EndpointState(c) == tcp.StateCloseWait }, 5*time.Second, time.Millisecond)
	require.NoError(t, c.CloseWrite())
	_, err = io.ReadAll(prog)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return netstack.EndpointState(c) == tcp.StateClose }, 5*time.Second, time.Millisecond)
	return c
}

// TestPeerResetNotAfterCleanClose: a connection closed cleanly both ways
// is not reset, even with a soft error on record, and keeps its unread
// data: the proxy, which asks while it does not read, would otherwise
// reset a connection whose data is still on its way.
func TestPeerResetNotAfterCleanClose(t *testing.T) {
	for _, soft := range []bool{false, true} {
		c := closedCleanly(t, "request body still queued", soft)
		require.False(t, c.PeerReset(), "soft error %v", soft)
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, "request body still queued", string(got))
	}
}

// TestAwaitResetNotAfterCleanClose: after its EOF, a connection closed
// cleanly both ways is not reported reset, whatever soft error it had.
func TestAwaitResetNotAfterCleanClose(t *testing.T) {
	c := closedCleanly(t, "m", true)
	_, err := io.ReadAll(c)
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(time.Second)))
	require.NoError(t, c.AwaitReset())
}

// TestPeerResetLeavesTheError: PeerReset sees an RST and leaves its error
// for the next read, which reports the reset rather than an end of
// stream.
func TestPeerResetLeavesTheError(t *testing.T) {
	ctx := testCtx(t)
	n, h := newMemory(t)
	claim, l := listenClaim(ctx, t, n)
	prog, accepted := pair(t, l, func() (net.Conn, error) { return h.Dial(ctx, claim) })
	c := accepted.(*netstack.Conn)
	_, err := prog.Write([]byte("partial"))
	require.NoError(t, err)
	require.NoError(t, prog.(interface{ SetLinger(int) error }).SetLinger(0))
	require.NoError(t, prog.Close())
	require.Eventually(t, c.PeerReset, 5*time.Second, time.Millisecond)
	require.True(t, c.PeerReset(), "asked twice")
	_, err = io.ReadAll(c)
	require.Error(t, err, "the read after PeerReset reports the reset")
}
