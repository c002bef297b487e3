package channels_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

const (
	payloadSize = 1 << 20
	numStreams  = 100
)

// randomPayload returns size bytes from a per-stream seeded generator.
func randomPayload(seed uint64, size int) []byte {
	b := make([]byte, size)
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16)})
	_, _ = rng.Read(b)
	return b
}

// exchange sends out on s while reading everything the peer sends, then
// checks the peer's bytes hash to want. Both directions flow at once, as
// they do for a proxied connection.
func exchange(s channels.Stream, out []byte, want [32]byte) error {
	errc := make(chan error, 1)
	go func() {
		_, err := s.Write(out)
		if err == nil {
			err = s.CloseWrite()
		}
		errc <- err
	}()
	h := sha256.New()
	n, rerr := io.Copy(h, s)
	werr := <-errc
	if err := errors.Join(werr, rerr); err != nil {
		return err
	}
	if got := [32]byte(h.Sum(nil)); got != want {
		return fmt.Errorf("received %d bytes that differ from the ones sent", n)
	}
	return s.Close()
}

// roundTrip runs numStreams concurrent streams, each carrying a distinct
// 1 MiB random payload both ways, and checks every byte.
func roundTrip(t *testing.T, tr channels.Transport, tune func(*channels.Config)) {
	req, reply, a, b := pair(t, tr, tune)
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()

	var wg sync.WaitGroup
	// The server side echoes nothing: it sends its own payload, chosen by
	// the stream's source port, and checks the client's.
	wg.Go(func() {
		var swg sync.WaitGroup
		for range numStreams {
			in, err := reply.Accept(ctx)
			if !assert.NoError(t, err) {
				return
			}
			swg.Go(func() {
				seed := uint64(in.Header.SourcePort)
				out := randomPayload(seed+1000, payloadSize)
				want := sha256.Sum256(randomPayload(seed, payloadSize))
				assert.NoError(t, exchange(in.Stream, out, want), "server side of stream %d", seed)
			})
		}
		swg.Wait()
	})
	for i := range numStreams {
		wg.Go(func() {
			seed := uint64(i + 1)
			s, m, err := req.Open(ctx, channels.Header{SourcePort: uint16(seed), TargetPort: 80})
			if !assert.NoError(t, err) {
				return
			}
			assert.Equal(t, "b", m.IID)
			out := randomPayload(seed, payloadSize)
			want := sha256.Sum256(randomPayload(seed+1000, payloadSize))
			assert.NoError(t, exchange(s, out, want), "client side of stream %d", seed)
		})
	}
	wg.Wait()
	// All of it went over the SessionsPerPeer sessions a dialed (the
	// second comes up in the background): no more.
	require.Eventually(t, func() bool {
		return a.NumSessions("b") == channels.DefaultSessionsPerPeer && b.NumSessions("a") == channels.DefaultSessionsPerPeer
	}, 5*time.Second, 10*time.Millisecond, "sessions: a→b %d, b→a %d", a.NumSessions("b"), b.NumSessions("a"))
	require.Eventually(t, func() bool { return len(channels.ActiveStreams(req)) == 0 },
		5*time.Second, 10*time.Millisecond, "active stream counts must drop to zero")
}

// TestRoundTripTCP runs over TCPTransport, which takes the same-host
// socket here, and over plain TCP.
func TestRoundTripTCP(t *testing.T) {
	t.Run("same-host", func(t *testing.T) { roundTrip(t, nil, nil) })
	t.Run("plain", func(t *testing.T) { roundTrip(t, channels.PlainTCPTransport(), nil) })
}

func TestRoundTripTLS(t *testing.T) {
	ca, files := writeCerts(t, t.TempDir(), "a", "b")
	roundTrip(t, nil, useCerts(t, ca, files))
}

func TestRoundTripMemory(t *testing.T) {
	roundTrip(t, channels.NewMemoryTransport(), nil)
}

func TestHeaderDelivered(t *testing.T) {
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), nil)
	s, in := open(t, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	assert.Equal(t, channels.Header{Channel: "svc", SourceIID: "a", SourcePort: 1234, TargetPort: 80}, in.Header)
	assert.Equal(t, "a", in.Peer.IID)
	assert.Equal(t, "test", in.Peer.Role)
}

func TestHalfClose(t *testing.T) {
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), nil)
	s, in := open(t, req, reply)

	// The client says its piece and half-closes.
	_, err := s.Write([]byte("request"))
	require.NoError(t, err)
	require.NoError(t, s.CloseWrite())
	_, err = s.Write([]byte("more"))
	require.ErrorIs(t, err, net.ErrClosed, "write after CloseWrite")

	// The server reads it up to EOF ...
	got, err := io.ReadAll(in.Stream)
	require.NoError(t, err)
	require.Equal(t, "request", string(got))
	assert.Equal(t, map[string]int{"b": 1}, channels.ActiveStreams(req), "half-closed stream is still active")

	// ... and can still answer, in several writes, before its own FIN.
	for _, part := range []string{"res", "ponse"} {
		_, err = in.Stream.Write([]byte(part))
		require.NoError(t, err)
	}
	require.NoError(t, in.Stream.CloseWrite())
	got, err = io.ReadAll(s)
	require.NoError(t, err)
	require.Equal(t, "response", string(got))

	// Both directions ended: the stream no longer counts.
	assert.Empty(t, channels.ActiveStreams(req))
	require.NoError(t, s.Close())
	require.NoError(t, in.Stream.Close())
}

func TestResetPropagates(t *testing.T) {
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), nil)

	t.Run("opener resets", func(t *testing.T) {
		s, in := open(t, req, reply)
		readErr := make(chan error, 1)
		go func() {
			_, err := in.Stream.Read(make([]byte, 10)) // pending when the RST arrives
			readErr <- err
		}()
		require.NoError(t, s.Reset())
		err := <-readErr
		require.ErrorIs(t, err, channels.ErrStreamReset)
		_, err = in.Stream.Read(make([]byte, 10))
		require.ErrorIs(t, err, channels.ErrStreamReset, "later reads fail too")
		require.Eventually(t, func() bool {
			_, err := in.Stream.Write([]byte("x"))
			return errors.Is(err, channels.ErrStreamReset)
		}, 5*time.Second, 5*time.Millisecond, "writes fail after the reset")
		assert.Empty(t, channels.ActiveStreams(req))
	})

	t.Run("acceptor resets", func(t *testing.T) {
		s, in := open(t, req, reply)
		_, err := s.Write([]byte("data before the reset"))
		require.NoError(t, err)
		require.NoError(t, in.Stream.Reset())
		_, err = io.ReadAll(s)
		require.ErrorIs(t, err, channels.ErrStreamReset)
		require.Eventually(t, func() bool { return len(channels.ActiveStreams(req)) == 0 },
			5*time.Second, 5*time.Millisecond)
		s.Close()
	})
}

func TestStreamDeadline(t *testing.T) {
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), nil)
	s, in := open(t, req, reply)
	defer in.Stream.Close()
	defer s.Close()
	require.NoError(t, s.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	_, err := s.Read(make([]byte, 1))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	require.True(t, ne.Timeout())
	// The stream still works after clearing the deadline.
	require.NoError(t, s.SetReadDeadline(time.Time{}))
	_, err = in.Stream.Write([]byte("late"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(s, buf)
	require.NoError(t, err)
	require.True(t, bytes.Equal(buf, []byte("late")))
}

func TestReadAfterClose(t *testing.T) {
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), nil)
	s, in := open(t, req, reply)
	require.NoError(t, s.Close())
	_, err := s.Read(make([]byte, 1))
	require.ErrorIs(t, err, net.ErrClosed)
	got, err := io.ReadAll(in.Stream)
	require.NoError(t, err, "Close sends FIN: the peer reads EOF")
	require.Empty(t, got)
	require.NoError(t, in.Stream.Close())
	assert.Empty(t, channels.ActiveStreams(req))
}

// TestSessionDeathIsNotEOF: streams of a session that dies fail with a
// reset that no caller can mistake for a clean end of stream.
func TestSessionDeathIsNotEOF(t *testing.T) {
	req, reply, _, b := pair(t, nil, nil)
	s, in := open(t, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	require.NoError(t, b.Close()) // the peer's whole node goes away
	_, err := s.Read(make([]byte, 1))
	require.ErrorIs(t, err, channels.ErrStreamReset)
	require.False(t, errors.Is(err, io.EOF), "a dead session's stream must not read as EOF: %v", err)
}
