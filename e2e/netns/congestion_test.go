//go:build linux

package netns

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/legacy"
	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
)

// directPort is where every host's legacy server also listens on its
// bridge address, for connections that bypass the proxies (the "direct"
// route).
const directPort = 9300

// TestCongestedUplink compares the proxy with direct TCP on a congested
// link: srv-2's uplink is 1 Mbit/s with 65ms of delay and 0.4% loss, kept
// full by bulk uploads and interactive echoes from srv-2 to srv-1, and
// worsened every cycle for 3s (half the rate, 1% more loss: its queue
// overflows). Right after each worsening, a fresh echo connection (20
// frames of up to 4 KiB) goes from srv-1 to srv-2 through the proxies and
// another one directly, at the same time.
//
// It runs only when TCPPROXY_CONGESTION sets the number of cycles (about
// 9s each). TCPPROXY_CONGESTION_MODE chooses the load: "proxied" (all of
// it through the proxies, as in a deployment), "direct" (none of it, the
// baseline), or "mixed" (the default: half each, competing on the link).
// Every connection, load and probes, must verify; the probes' times are
// logged for comparison.
func TestCongestedUplink(t *testing.T) {
	cycles := 0
	if v := os.Getenv("TCPPROXY_CONGESTION"); v != "" {
		var err error
		cycles, err = strconv.Atoi(v)
		require.NoError(t, err, "TCPPROXY_CONGESTION")
		require.True(t, cycles > 0 && cycles <= 1000, "TCPPROXY_CONGESTION in 1..1000")
	}
	if cycles == 0 {
		t.Skip("set TCPPROXY_CONGESTION to a number of cycles to run it")
	}
	mode := os.Getenv("TCPPROXY_CONGESTION_MODE")
	if mode == "" {
		mode = "mixed"
	}
	require.Contains(t, []string{"mixed", "proxied", "direct"}, mode, "TCPPROXY_CONGESTION_MODE")

	c := newCluster(t, fourHosts[:2])
	srv1, srv2 := c.hosts[0], c.hosts[1]
	for _, h := range c.hosts {
		ln, err := h.Listen(netip.AddrPortFrom(h.Addr, directPort).String())
		require.NoError(t, err)
		h.lns = append(h.lns, ln)
		h.server.Serve(ln)
	}
	fast := ns.Impairment{Rate: 50e6, Delay: 52 * time.Millisecond, Jitter: 5 * time.Millisecond, Loss: 0.004, Reorder: 0.007}
	slow := ns.Impairment{Rate: 1e6, Delay: 65 * time.Millisecond, Jitter: 6 * time.Millisecond, Loss: 0.004, Reorder: 0.017}
	worse := slow
	worse.Rate, worse.Delay, worse.Loss = slow.Rate/2, 3*slow.Delay/2, slow.Loss+0.01
	imp1, err := srv1.Impair(fast, subnet.String())
	require.NoError(t, err)
	defer func() { _ = imp1.Stop() }()
	imp2, err := srv2.Impair(slow, subnet.String())
	require.NoError(t, err)
	defer func() { _ = imp2.Stop() }()

	ring := func(from, to *host) route { return route{from: from, path: "ring", to: to} }
	direct := func(from, to *host) route { return route{from: from, path: "direct", to: to} }
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// The load ends before the cluster does, even when a check fails.
	halt := sync.OnceFunc(func() {
		close(stop)
		wg.Wait()
	})
	defer halt()
	loop := func(run func()) {
		wg.Go(func() {
			for n := 0; n < maxConnsPerWorker; n++ {
				select {
				case <-stop:
					return
				default:
				}
				run()
			}
		})
	}
	bulk := legacy.ClientSpec{Mode: legacy.Sink, Frames: 12, MinSize: 16 << 10, MaxSize: 32 << 10, Bound: soakConnBound}
	echo := legacy.ClientSpec{Mode: legacy.Echo, Frames: 30, MinSize: 1, MaxSize: 512, Interval: 200 * time.Millisecond, Bound: soakConnBound}
	for i := range 2 {
		proxied := mode == "proxied" || mode == "mixed" && i == 0
		for _, spec := range []legacy.ClientSpec{bulk, echo, echo, echo, echo, echo, echo} {
			if proxied {
				loop(func() { c.run(ring(srv2, srv1), spec) })
			} else {
				loop(func() { c.run(direct(srv2, srv1), spec) })
			}
		}
	}

	probe := legacy.ClientSpec{Mode: legacy.Echo, Frames: 20, MinSize: 1, MaxSize: 4096, Bound: soakConnBound}
	var viaProxy, straight []time.Duration
	for i := range cycles {
		time.Sleep(3 * time.Second)
		require.NoError(t, imp2.Stop())
		bad, err := srv2.Impair(worse, subnet.String())
		require.NoError(t, err)
		time.Sleep(3 * time.Second)
		require.NoError(t, bad.Stop())
		imp2, err = srv2.Impair(slow, subnet.String())
		require.NoError(t, err)

		var p, d legacy.Record
		var probes sync.WaitGroup
		probes.Go(func() { p = c.run(ring(srv1, srv2), probe) })
		probes.Go(func() { d = c.run(direct(srv1, srv2), probe) })
		probes.Wait()
		viaProxy, straight = append(viaProxy, p.End.Sub(p.Start)), append(straight, d.End.Sub(d.Start))
		assert.Equal(t, legacy.OK, p.Outcome, "probe through the proxies: %v", p)
		assert.Equal(t, legacy.OK, d.Outcome, "direct probe: %v", d)
		t.Logf("cycle %d: through the proxies %v, direct %v; worse link %+v", i,
			viaProxy[i].Round(time.Millisecond), straight[i].Round(time.Millisecond), bad.Stats())
	}
	halt()
	c.waitServersIdle(30 * time.Second)

	in := c.checkIntegrity(t)
	all := in.Clients
	assert.Equal(t, all.Conns, all.OK, "every connection verifies: %s", failures(all))
	t.Logf("load %s, %d cycles; probe times through the proxies: %s; direct: %s; %v",
		mode, cycles, quantiles(viaProxy), quantiles(straight), all)
}

// quantiles describes ds by its median, 90th percentile and maximum.
func quantiles(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	return fmt.Sprintf("p50 %v p90 %v max %v", ms(s[len(s)/2]), ms(s[len(s)*9/10]), ms(s[len(s)-1]))
}
