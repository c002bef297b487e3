//go:build linux

package ns

import (
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func newTestNet(t *testing.T, hosts int) *Net {
	t.Helper()
	if err := Check(); err != nil {
		t.Skipf("network namespaces unavailable: %v", err)
	}
	n, err := NewNet(RandomPrefix(), hosts, netip.MustParsePrefix("10.213.0.0/24"))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, n.Delete()) })
	return n
}

// rtt measures one small round trip from a to an echo server on b.
func rtt(t *testing.T, a, b *Host, port string) time.Duration {
	c, err := a.Dial(b.Addr.String()+":"+port, 5*time.Second)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	buf := make([]byte, 1)
	start := time.Now()
	_, err = c.Write([]byte{1})
	require.NoError(t, err)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	return time.Since(start)
}

func TestNetAndFaults(t *testing.T) {
	n := newTestNet(t, 2)
	h1, h2 := n.Hosts[0], n.Hosts[1]
	ln, err := h2.Listen(h2.Addr.String() + ":7100")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()

	base := rtt(t, h1, h2, "7100")
	require.Less(t, base, 50*time.Millisecond)

	imp, err := h1.Impair(Impairment{Delay: 30 * time.Millisecond}, "10.213.0.0/24")
	require.NoError(t, err)
	t.Logf("impairment method: %s", imp.Method)
	slow := rtt(t, h1, h2, "7100")
	require.GreaterOrEqual(t, slow, 30*time.Millisecond)
	require.NoError(t, imp.Stop())
	require.NoError(t, imp.Stop())
	require.Less(t, rtt(t, h1, h2, "7100"), 30*time.Millisecond)
	if imp.Method == "tun" {
		require.Positive(t, imp.Stats().Packets)
	}

	// A link down at the bridge: connections time out, nothing answers.
	require.NoError(t, n.LinkDown(h2))
	_, err = h1.Dial(h2.Addr.String()+":7100", 500*time.Millisecond)
	require.Error(t, err)
	require.NoError(t, n.LinkUp(h2))
	require.Eventually(t, func() bool {
		c, err := h1.Dial(h2.Addr.String()+":7100", time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, 10*time.Second, 100*time.Millisecond)
}

// TestImpairRate: a link with a rate carries data no faster than it.
func TestImpairRate(t *testing.T) {
	n := newTestNet(t, 2)
	h1, h2 := n.Hosts[0], n.Hosts[1]
	ln, err := h2.Listen(h2.Addr.String() + ":7101")
	require.NoError(t, err)
	defer ln.Close()
	received := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- 0
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		received <- n
	}()
	const rate, size = 16_000_000, 2 << 20 // bits/s, bytes: one second
	imp, err := h1.Impair(Impairment{Delay: 10 * time.Millisecond, Rate: rate}, "10.213.0.0/24")
	require.NoError(t, err)
	defer imp.Stop()
	c, err := h1.Dial(h2.Addr.String()+":7101", 5*time.Second)
	require.NoError(t, err)
	start := time.Now()
	_, err = c.Write(make([]byte, size))
	require.NoError(t, err)
	require.NoError(t, c.Close())
	require.Equal(t, int64(size), <-received)
	took := time.Since(start)
	t.Logf("%d bytes at %d bit/s in %v (%s)", size, rate, took, imp.Method)
	require.GreaterOrEqual(t, took, time.Duration(float64(size*8)/rate*0.9*float64(time.Second)))
}
