package mux

import (
	"context"
	"encoding/binary"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestOpenBurstWaitsForAccept: a connection pool warming up opens 8,000
// streams at once, far more than the peer's accept backlog (1,024), which
// its acceptor drains at its own pace. Each open waits for room among the
// streams the peer has not accepted yet instead of overflowing its
// backlog: none is reset, and every stream carries its bytes both ways.
func TestOpenBurstWaitsForAccept(t *testing.T) {
	const streams = 8000
	cli, srv := tcpPair(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The acceptor: one loop handing streams to a few echoing workers.
	accepted := make(chan *Stream)
	var workers sync.WaitGroup
	for range 8 {
		workers.Go(func() {
			for st := range accepted {
				var b [4]byte
				if _, err := io.ReadFull(st, b[:]); err == nil {
					_, _ = st.Write(b[:])
				}
				st.Close()
			}
		})
	}
	workers.Go(func() {
		defer close(accepted)
		for range streams {
			st, err := srv.AcceptStream(ctx)
			if err != nil {
				return
			}
			accepted <- st
		}
	})

	var failed atomic.Int64
	var firstErr sync.Once
	var openers sync.WaitGroup
	for i := range streams {
		openers.Go(func() {
			err := func() error {
				st, err := cli.OpenStream(ctx)
				if err != nil {
					return err
				}
				defer st.Close()
				var out, in [4]byte
				binary.BigEndian.PutUint32(out[:], uint32(i))
				if _, err := st.Write(out[:]); err != nil {
					return err
				}
				if _, err := io.ReadFull(st, in[:]); err != nil {
					return err
				}
				if in != out {
					return io.ErrUnexpectedEOF
				}
				return nil
			}()
			if err != nil {
				failed.Add(1)
				firstErr.Do(func() { t.Errorf("stream %d: %v", i, err) })
			}
		})
	}
	openers.Wait()
	workers.Wait()
	require.Zero(t, failed.Load(), "of %d streams", streams)
	require.Zero(t, srv.LimitStats().RefusedBacklog)
}

// TestOpenWaitsForPeerAccept: past MaxPendingOpens streams the peer has
// not accepted, OpenStream waits, bounded by its context; once the peer
// accepts one, the next open goes on.
func TestOpenWaitsForPeerAccept(t *testing.T) {
	cli, srv := tcpPair(t, Config{MaxPendingOpens: 2})
	ctx := testCtx(t)
	var opened []*Stream
	for i := range 2 {
		st, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		_, err = st.Write([]byte{byte(i)})
		require.NoError(t, err)
		opened = append(opened, st)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err := cli.OpenStream(short)
	require.ErrorIs(t, err, context.DeadlineExceeded)

	third := make(chan *Stream, 1)
	go func() {
		st, err := cli.OpenStream(ctx)
		if err == nil {
			third <- st
		}
		close(third)
	}()
	peer, err := srv.AcceptStream(ctx)
	require.NoError(t, err)
	var b [1]byte
	_, err = io.ReadFull(peer, b[:])
	require.NoError(t, err)
	require.Equal(t, byte(0), b[0])
	st, ok := <-third
	require.True(t, ok, "open after an accept")
	_, err = st.Write([]byte{2})
	require.NoError(t, err)
	for want := byte(1); want <= 2; want++ {
		peer, err := srv.AcceptStream(ctx)
		require.NoError(t, err)
		var b [1]byte
		_, err = io.ReadFull(peer, b[:])
		require.NoError(t, err)
		require.Equal(t, want, b[0])
	}
	require.Zero(t, srv.LimitStats().RefusedBacklog)

	// Accepted streams hold no place, whatever becomes of them; streams
	// that end before the peer accepts them give theirs back.
	st.Reset()
	opened[1].Reset()
	var waiting []*Stream
	for range 2 {
		w, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		_, err = w.Write([]byte{9})
		require.NoError(t, err)
		waiting = append(waiting, w)
	}
	short, cancel = context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = cli.OpenStream(short)
	require.ErrorIs(t, err, context.DeadlineExceeded, "two streams wait for the peer")
	for _, w := range waiting {
		w.Reset()
	}
	for range 2 {
		w, err := cli.OpenStream(ctx)
		require.NoError(t, err)
		w.Reset()
	}
}
