package channels_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// logLines records the messages of the log records at warning level and
// above, or with info set at info level and above.
type logLines struct {
	info bool
	mu   sync.Mutex
	msgs []string
}

func (h *logLines) Enabled(_ context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn || h.info && l >= slog.LevelInfo
}
func (h *logLines) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logLines) WithGroup(string) slog.Handler      { return h }
func (h *logLines) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.msgs = append(h.msgs, b.String())
	return nil
}

func (h *logLines) lines() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.msgs...)
}

// count returns how many lines start with msg.
func (h *logLines) count(msg string) int {
	k := 0
	for _, l := range h.lines() {
		if strings.HasPrefix(l, msg+" ") {
			k++
		}
	}
	return k
}

// concurrently runs f(i) for i in [0, n), at most width at a time.
func concurrently(n, width int, f func(i int)) {
	sem := make(chan struct{}, width)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			f(i)
		})
	}
	wg.Wait()
}

// TestRefusalFloodLogsBounded floods a node with 2,000 failed handshakes
// (idle connections that time out, garbage, strangers) and 2,000 bad
// streams from a member: the log gets a line for the first refusal and a
// summary, the counters get every one.
func TestRefusalFloodLogsBounded(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	defer channels.SetRefusalLogInterval(time.Hour)()
	logs := &logLines{}
	var seen refusals
	tr := channels.NewMemoryTransport()
	cfg := baseConfig("b", tr, membership.Static(channels.Member{IID: "x"}))
	cfg.Logger = slog.New(logs)
	cfg.HandshakeTimeout = 300 * time.Millisecond
	cfg.OnRefused = seen.add
	cfg.MaxHandshakes = 2000 // more than the idle connections at once: none refused for that
	b, err := channels.NewNode(cfg)
	require.NoError(t, err)
	_, err = b.Reply("svc")
	require.NoError(t, err)
	require.NoError(t, b.Start(context.Background()))
	defer b.Close()

	const flood = 2000
	// Idle connections, all at once, until the node hangs up; then
	// garbage and strangers, a few at a time, so that they do not take
	// longer than the handshake timeout on a loaded machine.
	const idle = flood / 3
	attempt := func(i int) {
		c, err := tr.Dial(context.Background(), b.Addr())
		if !assert.NoError(t, err) {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		switch {
		case i < idle:
		case i%2 == 0:
			_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"))
		default:
			if assert.NoError(t, wire.WriteHello(c, wire.Hello{IID: fmt.Sprintf("stranger-%d", i), Role: "r"})) {
				rp, err := wire.ReadReply(c)
				assert.NoError(t, err)
				assert.False(t, rp.Accepted)
			}
		}
		// The node hangs up: EOF, after the reply saying why to garbage.
		_, err = io.Copy(io.Discard, c)
		assert.NoError(t, err, "the node hangs up")
	}
	concurrently(idle, idle, attempt)
	concurrently(flood-idle, 8, func(i int) { attempt(idle + i) })

	// A member's session, with streams the node refuses.
	c := rawDial(t, tr, b.Addr())
	require.NoError(t, wire.WriteHello(c, wire.Hello{IID: "x"}))
	rp, err := wire.ReadReply(c)
	require.NoError(t, err)
	require.True(t, rp.Accepted)
	require.NoError(t, c.SetDeadline(time.Time{}))
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	defer sess.Close()
	header, err := wire.AppendStreamHeader(nil, wire.StreamHeader{Channel: "nope", SourceIID: "x"})
	require.NoError(t, err)
	concurrently(flood, 100, func(int) {
		st, err := sess.OpenStream(context.Background())
		if !assert.NoError(t, err) {
			return
		}
		_, err = st.Write(header)
		assert.NoError(t, err)
		_, err = st.Read(make([]byte, 1))
		assert.ErrorIs(t, err, mux.ErrStreamReset)
	})

	seen.wait(t, map[string]int{
		channels.RefusedTimeout:   idle,
		channels.RefusedProtocol:  (flood - idle) / 2,
		channels.RefusedNotMember: (flood - idle) / 2,
		channels.RefusedChannel:   flood,
	})
	assert.Equal(t, 1, len(logs.lines()), "during the flood, only the first refusal is logged:\n%s", strings.Join(logs.lines(), "\n"))
	require.NoError(t, b.Close())
	lines := logs.lines()
	require.Len(t, lines, 2, "then one summary:\n%s", strings.Join(lines, "\n"))
	assert.Contains(t, lines[1], fmt.Sprintf("sessions=%d streams=%d", flood-1, flood))
}

// TestRefusalLogTracksBoundedAddresses: refusals from many addresses give
// at most a line per tracked address and one summary for the rest.
func TestRefusalLogTracksBoundedAddresses(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	defer channels.SetRefusalLogInterval(time.Hour)()
	logs := &logLines{}
	var seen refusals
	mt := channels.NewMemoryTransport()
	cfg := onHost("b", mt, "10.1.0.1", membership.Static())
	cfg.Logger = slog.New(logs)
	cfg.OnRefused = seen.add
	cfg.MaxHandshakes = 2000 // handshakes that ended may not have been counted out yet
	b, err := channels.NewNode(cfg)
	require.NoError(t, err)
	require.NoError(t, b.Start(context.Background()))
	defer b.Close()

	const flood = 2000
	concurrently(flood, 100, func(i int) {
		from := netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)})
		c, err := mt.From(from).Dial(context.Background(), b.Addr())
		if !assert.NoError(t, err) {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if assert.NoError(t, wire.WriteHello(c, wire.Hello{IID: "x"})) {
			rp, err := wire.ReadReply(c)
			assert.NoError(t, err)
			assert.Contains(t, rp.Reason, "no TLS")
		}
	})
	seen.wait(t, map[string]int{channels.RefusedPlaintext: flood})
	assert.Equal(t, channels.MaxRefusalAddrs, logs.count("session refused"))
	require.NoError(t, b.Close())
	assert.Equal(t, channels.MaxRefusalAddrs, logs.count("session refused"))
	require.Equal(t, 1, logs.count("refused again"), "one summary, for the untracked addresses")
	assert.Len(t, logs.lines(), channels.MaxRefusalAddrs+1)
	assert.Contains(t, logs.lines()[channels.MaxRefusalAddrs], fmt.Sprintf("sessions=%d", flood-channels.MaxRefusalAddrs))
}
