package proxy

import (
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// gatedStream is a stream whose Writes wait for gate: a send waiting for
// window because the far program does not read.
type gatedStream struct {
	tcpStream
	gate       chan struct{}
	closeWrite atomic.Int32
}

func (s *gatedStream) Write(p []byte) (int, error) {
	<-s.gate
	return s.tcpStream.Write(p)
}

func (s *gatedStream) CloseWrite() error {
	s.closeWrite.Add(1)
	return s.tcpStream.CloseWrite()
}

// TestPeerResetLeavesTheReset: the stalled-send check sees a legacy
// program's reset while the relay's send waits, and leaves the error in
// the socket: if the send completes before the connection is reset (the
// far program starts reading just then), the relay's next read reports
// the reset, and no FIN passes it off as a clean end of stream.
func TestPeerResetLeavesTheReset(t *testing.T) {
	client, legacy := tcpPair(t)
	far, _ := tcpPair(t)
	st := &gatedStream{tcpStream: tcpStream{far}, gate: make(chan struct{})}
	var counter, activity atomic.Int64
	var sends sendWatch
	done := make(chan pipeResult, 1)
	go func() { done <- pipe(st, legacy, &counter, &activity, &sends) }()

	_, err := client.Write([]byte("hello"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return sends.n.Load()&1 == 1 }, 5*time.Second, time.Millisecond, "the send never began")
	require.False(t, peerReset(legacy), "not reset yet")
	require.NoError(t, client.SetLinger(0))
	require.NoError(t, client.Close())
	require.Eventually(t, func() bool { return peerReset(legacy) }, 5*time.Second, time.Millisecond, "the check never saw the reset")

	close(st.gate)
	res := <-done
	require.ErrorIs(t, res.err, syscall.ECONNRESET, "pipe ended with %v (%s)", res.err, res.op)
	require.Zero(t, st.closeWrite.Load(), "a FIN went to the far side for a reset connection")
}
