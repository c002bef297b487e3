package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

// syncBuffer is a log destination that tests can read while the proxy
// writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFailedBurstLogsOnce: a pool opening connections through a request
// channel whose peers are all gone gets every connection reset and
// counted, but the log gets one warning, not one per connection.
func TestFailedBurstLogsOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), proxytest.Timeout)
	defer cancel()
	var logs syncBuffer
	p, err := proxy.New(proxy.Config{
		IID: "c-1", Role: "c",
		Channels:   map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 7000}},
		Addressing: ranges(231),
		Node:       channels.Config{Members: membership.Static()},
		Logger:     slog.New(slog.NewTextHandler(&logs, nil)),
	})
	require.NoError(t, err)
	events := proxytest.Record(p.Events())
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	require.IsType(t, proxy.Ready{}, events.Next(t))
	change := events.Next(t).(proxy.Change)

	const burst = 50
	for range burst {
		c, err := net.Dial("tcp", net.JoinHostPort(change.IP.String(), "7000"))
		if errors.Is(err, syscall.ECONNRESET) {
			continue // reset before connect returned: as good as after
		}
		require.NoError(t, err)
		_ = c.SetReadDeadline(time.Now().Add(proxytest.Timeout))
		_, err = io.ReadAll(c)
		require.Error(t, err, "the connection is reset, not ended")
		c.Close()
	}
	require.Eventually(t, func() bool { return p.Stats()[0].Failed == burst }, proxytest.Timeout, time.Millisecond, "every failure counted")
	assert.Equal(t, 1, strings.Count(logs.String(), "open stream failed"), "one warning for the burst:\n%s", logs.String())
	require.NoError(t, p.Shutdown(ctx))
	events.WaitClosed(t)
}
