//go:build linux

package netns

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/legacy"
)

// TestAllPaths carries verified traffic along every path of the mesh, in
// both modes, at once: api from each client (reaching both servers) and
// ring between every ordered pair of hosts.
func TestAllPaths(t *testing.T) {
	c := newCluster(t, fourHosts)
	var routes []route
	for range 4 { // round-robin: each client reaches both servers
		routes = append(routes, c.apiRoutes()...)
	}
	routes = append(routes, c.ringRoutes()...)
	var wg sync.WaitGroup
	for i, r := range routes {
		for _, mode := range []legacy.Mode{legacy.Echo, legacy.Sink} {
			wg.Go(func() {
				rec := c.run(r, legacy.ClientSpec{Mode: mode, Frames: 40, MinSize: 1, MaxSize: 64 << 10, Bound: 60 * time.Second, Seed: uint64(i + 1)})
				assert.Equal(t, legacy.OK, rec.Outcome, "%v: %v", r, rec)
			})
		}
	}
	wg.Wait()
	c.waitServersIdle(10 * time.Second)
	in := c.checkIntegrity(t)
	c.checkCallerAddresses(t)
	require.Equal(t, 2*len(routes), in.Clients.OK)
	served := map[string]int{}
	for _, r := range c.clients.Records() {
		if r.Path == "api" {
			served[r.Peer]++
		}
	}
	assert.Positive(t, served["srv-1"], "api reached srv-1")
	assert.Positive(t, served["srv-2"], "api reached srv-2")
	t.Logf("all paths: %v", in)
}
