//go:build linux

package netns

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/legacy"
)

// Soak settings; see the package documentation.
const (
	defaultSoak        = 20 * time.Second
	defaultSoakWorkers = 8
	// maxConnsPerWorker bounds each worker's loop in count as well as in
	// time.
	maxConnsPerWorker = 100_000
	// soakConnBound is a soak connection's time limit; passing it is a
	// hang. It exceeds the keepalive bound (15s + 10s) so that a real
	// failure is always reported by the proxy first.
	soakConnBound = 60 * time.Second
)

func soakSettings(t *testing.T) (time.Duration, int) {
	d, workers := defaultSoak, defaultSoakWorkers
	if s := os.Getenv("TCPPROXY_SOAK"); s != "" {
		v, err := time.ParseDuration(s)
		require.NoError(t, err, "TCPPROXY_SOAK")
		require.Positive(t, v, "TCPPROXY_SOAK")
		d = v
	}
	if s := os.Getenv("TCPPROXY_SOAK_WORKERS"); s != "" {
		v, err := strconv.Atoi(s)
		require.NoError(t, err, "TCPPROXY_SOAK_WORKERS")
		require.True(t, v > 0 && v <= 256, "TCPPROXY_SOAK_WORKERS in 1..256")
		workers = v
	}
	return d, workers
}

// TestSoak runs workers that each open connection after connection along
// random paths (api, ring), in random modes, with random frame counts and
// sizes, while faults are injected one after another on random hosts:
// netem-like degradation, a short link flap, SIGKILL of a proxy and its
// restart. After each fault new connections through the host must verify
// again before the next one. At the end: nothing corrupt, nothing hung,
// nothing silently lost or truncated, and every failed connection is
// explained by a fault on a host it went through.
func TestSoak(t *testing.T) {
	d, workers := soakSettings(t)
	c := newCluster(t, fourHosts)
	start := time.Now()
	stop := start.Add(d)

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
			ring, api := c.ringRoutes(), c.apiRoutes()
			for n := 0; n < maxConnsPerWorker && time.Now().Before(stop) && !c.closing(); n++ {
				r := ring[rng.IntN(len(ring))]
				if rng.IntN(3) == 0 {
					r = api[rng.IntN(len(api))]
				}
				mode := legacy.Echo
				if rng.IntN(2) == 0 {
					mode = legacy.Sink
				}
				c.run(r, legacy.ClientSpec{
					Mode: mode, Frames: 1 + rng.IntN(150), MinSize: 1,
					MaxSize: []int{256, 4 << 10, 32 << 10, 128 << 10}[rng.IntN(4)],
					Bound:   soakConnBound, Seed: rng.Uint64(),
				})
			}
		})
	}

	faults := c.injectFaults(t, stop.Add(-2*time.Second))
	wg.Wait()
	c.waitServersIdle(30 * time.Second)
	in := c.checkIntegrity(t)
	unexplained := c.unexplainedFailures(faults)
	for _, r := range unexplained[:min(len(unexplained), 20)] {
		t.Errorf("failure not explained by any fault on its hosts: %v", r)
	}

	var kinds []string
	recovered := 0
	count := map[string]int{}
	for _, f := range faults {
		count[f.Kind]++
		if f.Survived {
			recovered++
		}
		assert.True(t, f.Survived, "fault %v", f)
	}
	for k, n := range count {
		kinds = append(kinds, fmt.Sprintf("%s×%d", k, n))
	}
	slices.Sort(kinds)
	elapsed := time.Since(start)
	clients := in.Clients
	summary := fmt.Sprintf("soak %v, %d workers: %d connections, %d ok, %d failed (%s); "+
		"client bytes sent %d, verified %d (%.1f MB/s); corrupt=%d lost=%d truncated=%d hung=%d unexplained=%d; "+
		"faults injected %d (%s), recovered %d",
		elapsed.Round(time.Second), workers, clients.Conns, clients.OK, clients.Failed, failures(clients),
		clients.BytesSent, clients.BytesVerified, float64(clients.BytesVerified)/elapsed.Seconds()/1e6,
		clients.ByOutcome[legacy.Corrupt]+in.Servers.ByOutcome[legacy.Corrupt], in.Lost, in.Truncated,
		clients.ByOutcome[legacy.Timeout]+in.Servers.ByOutcome[legacy.Timeout], len(unexplained),
		len(faults), strings.Join(kinds, " "), recovered)
	var report strings.Builder
	report.WriteString(summary + "\n")
	for _, f := range faults {
		report.WriteString("  fault: " + f.String() + "\n")
	}
	fmt.Fprintf(&report, "  integrity: %v\n", in)
	t.Log(report.String())
	// The file also lists every failed connection (both sides), for study.
	failed := 0
	for _, r := range append(c.clients.Records(), c.servers.Records()...) {
		if r.Outcome != legacy.OK && failed < 1000 {
			failed++
			report.WriteString("  failed: " + r.String() + "\n")
		}
	}
	path := os.Getenv("TCPPROXY_SOAK_REPORT")
	if path == "" {
		path = filepath.Join(t.TempDir(), "soak-summary.txt")
	}
	require.NoError(t, os.WriteFile(path, []byte(report.String()), 0o644))

	assert.Positive(t, clients.OK)
	assert.Positive(t, len(faults))
}

func failures(s legacy.Summary) string {
	var parts []string
	for o, n := range s.ByOutcome {
		if o != legacy.OK {
			parts = append(parts, fmt.Sprintf("%s=%d", o, n))
		}
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

// injectFaults injects faults one after another until stop, each on a
// random host, and checks recovery after each one.
func (c *cluster) injectFaults(t *testing.T, stop time.Time) []fault {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	var faults []fault
	kinds := []string{"kill", "impair", "flap"}
	for i := 0; time.Now().Before(stop); i++ {
		time.Sleep(time.Second)
		if !time.Now().Before(stop) {
			break
		}
		h := c.hosts[rng.IntN(len(c.hosts))]
		f := fault{Kind: kinds[i%len(kinds)], Host: h.spec.iid, Start: time.Now()}
		switch f.Kind {
		case "impair":
			imp, err := h.Impair(netemFault, subnet.String())
			require.NoError(t, err)
			time.Sleep(3 * time.Second)
			require.NoError(t, imp.Stop())
			f.Detail = fmt.Sprintf("%s via %s, %+v", netemFault, imp.Method, imp.Stats())
		case "flap":
			require.NoError(t, c.net.LinkDown(h.Host))
			time.Sleep(1500 * time.Millisecond)
			require.NoError(t, c.net.LinkUp(h.Host))
			f.Detail = "link down 1.5s at the bridge"
		case "kill":
			h.killProxy()
			time.Sleep(500 * time.Millisecond)
			h.restartProxy()
			f.Detail = "SIGKILL, restart after 0.5s"
		}
		f.Survived = c.recovered(h, 30*time.Second)
		f.End = time.Now()
		faults = append(faults, f)
	}
	return faults
}

// recovered reports whether new connections to and from h verify within d.
func (c *cluster) recovered(h *host, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		other := c.hosts[0]
		if other == h {
			other = c.hosts[1]
		}
		if c.quick(route{from: other, path: "ring", to: h}).Outcome == legacy.OK &&
			c.quick(route{from: h, path: "ring", to: other}).Outcome == legacy.OK {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// unexplainedFailures returns the failed client connections that no fault
// explains. A connection may fail if it lived while the proxy of a host it
// went through was killed, or if it started while such a host's link was
// down (a new connection cannot be carried across a cut link). Degraded
// links and flaps under way must not fail established connections.
func (c *cluster) unexplainedFailures(faults []fault) []legacy.Record {
	const grace = 2 * time.Second
	var out []legacy.Record
	for _, r := range c.clients.Records() {
		if r.Outcome == legacy.OK {
			continue
		}
		hosts := c.involved(r)
		explained := false
		for _, f := range faults {
			if !slices.Contains(hosts, f.Host) {
				continue
			}
			switch f.Kind {
			case "kill":
				explained = r.Start.Before(f.End.Add(grace)) && r.End.After(f.Start)
			case "flap":
				explained = r.Start.After(f.Start.Add(-grace)) && r.Start.Before(f.End)
			}
			if explained {
				break
			}
		}
		if !explained {
			out = append(out, r)
		}
	}
	return out
}
