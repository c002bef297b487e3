package channels_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// TestConnectionBurst: a connection pool warming up opens 2,000
// connections one after another, as fast as connect returns, through a
// request channel to a reply instance, and keeps them open. The burst is
// far below the channel's connection limit: each stream waits for the
// reply side to take it, none is reset, and every connection works.
func TestConnectionBurst(t *testing.T) {
	const conns = 2000
	c := proxytest.NewCluster(t, proxytest.LoopbackInstance)
	c.Transport = channels.TCPTransport()
	srv := c.Add("srv", "server", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindReply, Port: 26302}})
	srv.Serve(t, 26302, func(c net.Conn) { _, _ = io.Copy(c, c) })
	cli := c.Add("cli", "client", map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 26301}})
	addr := cli.RequestAddr(t, "db")
	require.Eventually(t, func() bool {
		conn, err := net.Dial("tcp", addr.String())
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, proxytest.Timeout, 10*time.Millisecond, "request channel never listened")

	all := make([]net.Conn, 0, conns)
	defer func() {
		for _, conn := range all {
			conn.Close()
		}
	}()
	for range conns {
		conn, err := net.Dial("tcp", addr.String())
		require.NoError(t, err)
		all = append(all, conn)
	}
	failed := 0
	for i, conn := range all {
		var out, in [4]byte
		binary.BigEndian.PutUint32(out[:], uint32(i))
		_ = conn.SetDeadline(time.Now().Add(proxytest.Timeout))
		_, err := conn.Write(out[:])
		if err == nil {
			_, err = io.ReadFull(conn, in[:])
		}
		if err != nil || in != out {
			failed++
			if failed <= 5 {
				t.Errorf("connection %d: %v", i, err)
			}
		}
	}
	require.Zero(t, failed, "of %d connections", conns)
}

// TestAcceptBacklogBurst: streams that find their channel's accept queue
// full wait for room; once the consumer takes them, every one works.
func TestAcceptBacklogBurst(t *testing.T) {
	const streams = 40
	req, reply, _, _ := pair(t, channels.NewMemoryTransport(), func(c *channels.Config) { c.AcceptBacklog = 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	opened := make([]channels.Stream, streams)
	for i := range opened {
		s, _, err := req.Open(ctx, channels.Header{SourcePort: uint16(i)})
		require.NoError(t, err)
		defer s.Close()
		_, err = s.Write([]byte{byte(i)})
		require.NoError(t, err)
		opened[i] = s
	}
	for range streams {
		in, err := reply.Accept(ctx)
		require.NoError(t, err)
		var b [1]byte
		_, err = io.ReadFull(in.Stream, b[:])
		require.NoError(t, err)
		require.Equal(t, byte(in.Header.SourcePort), b[0])
		_, err = in.Stream.Write(b[:])
		require.NoError(t, err)
		in.Stream.Close()
	}
	for i, s := range opened {
		var b [1]byte
		_, err := io.ReadFull(s, b[:])
		require.NoError(t, err, "stream %d", i)
		require.Equal(t, byte(i), b[0])
	}
}

// TestConcurrentOpenBurst: a connection pool warming up against a reply
// channel opens 8,000 streams at once over real sessions, eight times the
// multiplexer's accept backlog and far below the channel's connection
// limit. Opens wait for the reply side to take their streams: none is
// reset, and every stream carries its bytes both ways.
func TestConcurrentOpenBurst(t *testing.T) {
	const streams = 8000
	req, reply, _, _ := pair(t, channels.TCPTransport(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var workers sync.WaitGroup
	for range 8 {
		workers.Go(func() {
			for {
				in, err := reply.Accept(ctx)
				if err != nil {
					return
				}
				var b [4]byte
				if _, err := io.ReadFull(in.Stream, b[:]); err == nil {
					_, _ = in.Stream.Write(b[:])
				}
				in.Stream.Close()
			}
		})
	}
	defer func() {
		cancel()
		workers.Wait()
	}()

	var failed atomic.Int64
	var first sync.Once
	var openers sync.WaitGroup
	for i := range streams {
		openers.Go(func() {
			err := func() error {
				s, _, err := req.Open(ctx, channels.Header{SourcePort: uint16(i)})
				if err != nil {
					return err
				}
				defer s.Close()
				var out, in [4]byte
				binary.BigEndian.PutUint32(out[:], uint32(i))
				if _, err := s.Write(out[:]); err != nil {
					return err
				}
				if _, err := io.ReadFull(s, in[:]); err != nil {
					return err
				}
				if in != out {
					return fmt.Errorf("echoed %x, sent %x", in, out)
				}
				return nil
			}()
			if err != nil {
				failed.Add(1)
				first.Do(func() { t.Errorf("stream %d: %v", i, err) })
			}
		})
	}
	openers.Wait()
	require.Zero(t, failed.Load(), "of %d streams", streams)
}

// TestWaitingStreamsBounded: streams that wait for room in a full channel
// queue keep their place among the session's pending streams (256), each
// a goroutine: a member that opens streams faster than the channel's
// consumer takes them holds at most that many goroutines of its peer,
// and its further opens wait for the peer instead.
func TestWaitingStreamsBounded(t *testing.T) {
	const streams = 1000
	req, _, _, _ := pair(t, channels.TCPTransport(), func(c *channels.Config) {
		c.AcceptBacklog = 1 // and nobody accepts
		c.SessionsPerPeer = 1
		c.HandshakeTimeout = time.Minute
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var opened atomic.Int64
	var openers sync.WaitGroup
	for i := range streams {
		openers.Go(func() {
			s, _, err := req.Open(ctx, channels.Header{SourcePort: uint16(i)})
			if err == nil {
				opened.Add(1)
				t.Cleanup(func() { s.Close() })
			}
		})
	}
	openers.Wait()
	require.Less(t, opened.Load(), int64(streams), "opens wait once the peer holds its bound of streams")
	require.LessOrEqual(t, goroutinesIn("(*session).handleStream"), 256)
}
