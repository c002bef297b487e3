//go:build linux

package netns

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/legacy"
	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
	"github.com/tcpproxy/tcpproxy/e2e/internal/proxybin"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// The mesh under test: two servers with a load-balanced "api" (reply) and
// two clients reaching it (request); all four in a duplex "ring" (mode
// both), each serving it and calling the others through impostors. Every
// proxy runs with the defaults of a real deployment (loopback network,
// 127.0.0.0/16 and 127.1.0.0/16), one per namespace like a pod sidecar.
const (
	apiPort       = 9000
	ringPort      = 9100
	transportPort = 7000
	requestIP     = "127.1.0.1" // the only request channel takes the first request IP
)

var subnet = netip.MustParsePrefix("10.213.0.0/24")

type hostSpec struct {
	iid, role string
	server    bool // serves "api"; otherwise calls it
}

var fourHosts = []hostSpec{
	{"srv-1", "server", true},
	{"srv-2", "server", true},
	{"cli-1", "client", false},
	{"cli-2", "client", false},
}

func TestMain(m *testing.M) {
	code := m.Run()
	proxybin.Cleanup()
	os.Exit(code)
}

// requireNamespaces skips the test where namespaces cannot be made.
func requireNamespaces(t *testing.T) {
	t.Helper()
	if err := ns.Check(); err != nil {
		t.Skipf("multi-host tests need root and iproute2 (CI runs them as root): %v", err)
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("the go command is needed to build the proxy: %v", err)
	}
}

type cluster struct {
	t       *testing.T
	net     *ns.Net
	dir     string
	members string
	certs   string // the certificates' directory, with TLS sessions
	bin     string
	hosts   []*host
	byIID   map[string]*host
	servers *legacy.Collector // every server side
	clients *legacy.Collector // every client side
	nextID  atomic.Uint64
	dumps   atomic.Int64 // slow connections' files written by dumpSockets
	// done is closed when the cluster shuts down: load loops stop.
	done     chan struct{}
	doneOnce sync.Once
}

// closing reports whether the cluster is shutting down.
func (c *cluster) closing() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

type host struct {
	*ns.Host
	c      *cluster
	spec   hostSpec
	bindIP netip.Addr
	// view assigns addresses as this host's proxy does: itself first,
	// then the members.
	view             *proxy.InstanceAllocator
	cfgPath, logPath string
	server           *legacy.Server
	lns              []net.Listener
	proc             *proxybin.Process

	mu    sync.Mutex
	kills []time.Time
}

// serverBound is the time limit of one server-side connection: longer
// than any client's, so that a server that times out really hung.
const serverBound = 90 * time.Second

// newCluster creates the namespaces, starts a legacy server and a proxy
// per host and waits until every proxy is ready. The proxies' sessions
// are plaintext.
func newCluster(t *testing.T, specs []hostSpec) *cluster {
	t.Helper()
	return newClusterWith(t, specs, clusterOptions{})
}

// clusterOptions change how newClusterWith configures the proxies.
type clusterOptions struct {
	// tls: sessions with mutual TLS, certificates from one CA (made by
	// `tcpproxy certs`), instead of plaintext.
	tls bool
}

// newClusterWith is newCluster with opts.
func newClusterWith(t *testing.T, specs []hostSpec, opts clusterOptions) *cluster {
	t.Helper()
	requireNamespaces(t)
	c := &cluster{t: t, bin: proxybin.Path(t), byIID: make(map[string]*host),
		servers: &legacy.Collector{}, clients: &legacy.Collector{}, done: make(chan struct{})}
	var err error
	c.net, err = ns.NewNet(ns.RandomPrefix(), len(specs), subnet)
	require.NoError(t, err)
	// Cleanups run last-registered first: this one, the namespaces'
	// removal, runs after the proxies and servers have stopped.
	t.Cleanup(func() {
		if err := c.net.Delete(); err != nil {
			t.Errorf("remove namespaces: %v", err)
		}
	})
	if os.Getenv("TCPPROXY_E2E_KEEP") != "" {
		c.dir, err = os.MkdirTemp("", "tcpproxy-e2e-"+t.Name()+"-")
		require.NoError(t, err)
	} else {
		c.dir = t.TempDir()
	}
	t.Logf("namespaces %s-*, files in %s, proxies built with race=%v", c.net.Prefix, c.dir, proxybin.Race())

	iids := make([]string, len(specs))
	var members strings.Builder
	members.WriteString("members:\n")
	for i, s := range specs {
		iids[i] = s.iid
		chans := fmt.Sprintf("ring: %d", ringPort)
		if s.server {
			chans = fmt.Sprintf("api: %d, ring: %d", apiPort, ringPort)
		}
		fmt.Fprintf(&members, "  - {iid: %s, role: %s, addr: \"%s:%d\", channels: {%s}}\n",
			s.iid, s.role, c.net.Hosts[i].Addr, transportPort, chans)
	}
	c.members = filepath.Join(c.dir, "members.yaml")
	require.NoError(t, os.WriteFile(c.members, []byte(members.String()), 0o644))
	if opts.tls {
		c.certs = filepath.Join(c.dir, "certs")
		ids := make([]string, len(specs))
		for i, s := range specs {
			ids[i] = s.iid + ":" + s.role
		}
		out, err := exec.Command(c.bin, append([]string{"certs", "-dir", c.certs}, ids...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}

	for i, s := range specs {
		h := &host{Host: c.net.Hosts[i], c: c, spec: s,
			view:    proxy.NewInstanceAllocator(proxy.DefaultInstanceRange),
			cfgPath: filepath.Join(c.dir, s.iid+".yaml"),
			logPath: filepath.Join(c.dir, s.iid+".log"),
		}
		h.proc = proxybin.NewProcess(s.iid, h.logPath)
		_, err := h.view.Add(s.iid)
		require.NoError(t, err)
		_, err = h.view.Ensure(iids...)
		require.NoError(t, err)
		h.bindIP, _ = h.view.Lookup(s.iid)
		c.hosts = append(c.hosts, h)
		c.byIID[s.iid] = h
	}
	t.Cleanup(c.shutdown)
	for _, h := range c.hosts {
		h.startServers()
		h.writeConfig()
		h.startProxy()
	}
	for _, h := range c.hosts {
		h.waitReady()
	}
	return c
}

// startServers runs the host's legacy servers: "api" on servers, "ring"
// everywhere, bound to the instance's own IP as the proxy tells a legacy
// program to.
func (h *host) startServers() {
	t := h.c.t
	h.server = &legacy.Server{Host: h.spec.iid, Bound: serverBound, Out: h.c.servers}
	ports := []int{ringPort}
	if h.spec.server {
		ports = append(ports, apiPort)
	}
	for _, port := range ports {
		ln, err := h.Listen(netip.AddrPortFrom(h.bindIP, uint16(port)).String())
		require.NoError(t, err)
		h.lns = append(h.lns, ln)
		h.server.Serve(ln)
	}
}

func (h *host) writeConfig() {
	api := fmt.Sprintf("{kind: request, port: %d}", apiPort)
	if h.spec.server {
		api = fmt.Sprintf("{kind: reply, port: %d}", apiPort)
	}
	// The sessions' congestion control: the host's default (new
	// namespaces take the machine's), or TCPPROXY_E2E_SESSION_CC's.
	cc := os.Getenv("TCPPROXY_E2E_SESSION_CC")
	transport := fmt.Sprintf("transport: {insecure: true, congestionControl: %q}", cc)
	if d := h.c.certs; d != "" {
		transport = fmt.Sprintf("transport: {congestionControl: %q}\ntls: {cert: %s/%s.pem, key: %s/%s-key.pem, ca: %s/ca.pem}", cc, d, h.spec.iid, d, h.spec.iid, d)
	}
	cfg := fmt.Sprintf(`iid: %s
role: %s
listen: %s:%d
members: {file: %s}
channels:
  api: %s
  ring: {kind: duplex, port: %d, mode: both}
%s
drainTimeout: 2s
log: {level: %s}
`, h.spec.iid, h.spec.role, h.Addr, transportPort, h.c.members, api, ringPort, transport, proxybin.LogLevel())
	require.NoError(h.c.t, os.WriteFile(h.cfgPath, []byte(cfg), 0o644))
}

// startProxy starts the host's tcpproxy (not waiting for it to be ready).
func (h *host) startProxy() {
	require.NoError(h.c.t, h.proc.Start(h.Command(h.c.bin, "run", "-config", h.cfgPath)))
}

// waitReady waits until the proxy started last logs that it is ready.
func (h *host) waitReady() {
	t := h.c.t
	if h.proc.WaitLog(`msg="proxy ready"`, 30*time.Second) {
		return
	}
	if h.proc.Exited() {
		require.FailNow(t, "proxy exited before it was ready", "%s: %v\n%s", h.spec.iid, h.proc.Err(), h.readLog())
	}
	require.FailNow(t, "proxy not ready in 30s", "%s:\n%s", h.spec.iid, h.readLog())
}

func (h *host) readLog() []byte {
	return h.proc.ReadLog()
}

// killProxy sends SIGKILL to the host's proxy and waits for it to die; it
// returns when the signal was sent.
func (h *host) killProxy() time.Time {
	t := h.c.t
	h.mu.Lock()
	at := time.Now()
	h.kills = append(h.kills, at)
	h.mu.Unlock()
	require.NoError(t, h.proc.Kill())
	if !h.proc.Wait(10 * time.Second) {
		require.FailNow(t, "killed proxy did not exit", h.spec.iid)
	}
	return at
}

// restartProxy starts a killed proxy again and waits until it is ready.
func (h *host) restartProxy() {
	h.startProxy()
	h.waitReady()
}

// killedDuring reports whether the host's proxy was killed in [from, to].
// A legacy server may accept a connection of the dead proxy from its
// listen backlog after the kill, so callers widen from.
func (h *host) killedDuring(from, to time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, k := range h.kills {
		if !k.Before(from) && !k.After(to) {
			return true
		}
	}
	return false
}

// shutdown stops every proxy (SIGTERM, then SIGKILL) and server, and
// fails the test if a proxy reported a data race or panicked. On failure
// it prints the end of every proxy's log.
func (c *cluster) shutdown() {
	t := c.t
	c.doneOnce.Do(func() { close(c.done) })
	var wg sync.WaitGroup
	for _, h := range c.hosts {
		wg.Go(func() {
			if !h.proc.Stop(10 * time.Second) {
				t.Errorf("%s: proxy did not exit 10s after SIGTERM; killing it", h.spec.iid)
			}
		})
	}
	wg.Wait()
	for _, h := range c.hosts {
		for _, ln := range h.lns {
			_ = ln.Close()
		}
		if h.server != nil && !h.server.Wait(10*time.Second) {
			t.Errorf("%s: %d legacy server connections still open 10s after the proxies stopped", h.spec.iid, h.server.Active())
		}
	}
	for _, h := range c.hosts {
		log := h.readLog()
		if i := bytes.Index(log, []byte("WARNING: DATA RACE")); i >= 0 {
			t.Errorf("%s: the proxy reported a data race:\n%s", h.spec.iid, excerpt(log, i, 6000))
		}
		if i := bytes.Index(log, []byte("panic:")); i >= 0 {
			t.Errorf("%s: the proxy panicked:\n%s", h.spec.iid, excerpt(log, i, 6000))
		}
		if t.Failed() {
			t.Logf("--- end of %s's log (%s):\n%s", h.spec.iid, h.logPath, proxybin.Tail(log, 40))
		}
	}
}

func excerpt(b []byte, i, n int) []byte {
	return b[i:min(len(b), i+n)]
}

// route is a path of a connection: from a host's legacy client, through
// "api" (to a server the balancer picks; to is nil) or "ring" (to a
// given member).
type route struct {
	from *host
	path string
	to   *host
}

func (r route) String() string {
	if r.to == nil {
		return r.from.spec.iid + " -api-> *"
	}
	return r.from.spec.iid + " -" + r.path + "-> " + r.to.spec.iid
}

// target is the address the legacy client connects to: the proxy's, or
// on the "direct" path the legacy server's own, bypassing the proxies.
func (r route) target() string {
	switch r.path {
	case "api":
		return fmt.Sprintf("%s:%d", requestIP, apiPort)
	case "direct":
		return netip.AddrPortFrom(r.to.Addr, directPort).String()
	}
	ip, ok := r.from.view.Lookup(r.to.spec.iid)
	if !ok {
		panic("no address for " + r.to.spec.iid)
	}
	return netip.AddrPortFrom(ip, ringPort).String()
}

// ringRoutes lists every ordered pair of distinct hosts.
func (c *cluster) ringRoutes() []route {
	var rs []route
	for _, a := range c.hosts {
		for _, b := range c.hosts {
			if a != b {
				rs = append(rs, route{from: a, path: "ring", to: b})
			}
		}
	}
	return rs
}

// apiRoutes lists the api clients' routes.
func (c *cluster) apiRoutes() []route {
	var rs []route
	for _, h := range c.hosts {
		if !h.spec.server {
			rs = append(rs, route{from: h, path: "api"})
		}
	}
	return rs
}

// run connects along r and runs spec (Host, Path and, when zero, ID
// filled in here), recording the client's outcome.
func (c *cluster) run(r route, spec legacy.ClientSpec) legacy.Record {
	if spec.ID == 0 {
		spec.ID = c.nextID.Add(1)
	}
	spec.Host, spec.Path = r.from.spec.iid, r.path
	if spec.Seed == 0 {
		spec.Seed = spec.ID * 0x9e3779b97f4a7c15
	}
	start := time.Now()
	var rec legacy.Record
	conn, err := r.from.Dial(r.target(), 5*time.Second)
	if err != nil {
		rec = legacy.ClientFailed(spec, start, err)
	} else {
		after := slowConn
		if spec.Bound > 0 {
			after = min(after, 2*spec.Bound/3)
		}
		slow := time.AfterFunc(after, func() {
			if c.dumps.Add(1) <= maxSocketDumps {
				c.dumpSockets(fmt.Sprint(spec.ID),
					fmt.Sprintf("connection #%d along %v from %v, running for %v", spec.ID, r, conn.LocalAddr(), after),
					append([]*host{r.from}, c.serverHosts(r)...))
			}
		})
		rec = legacy.RunClient(conn, spec)
		slow.Stop()
	}
	if rec.Peer == "" && r.to != nil {
		rec.Peer = r.to.spec.iid
	}
	if rec.Peer == "" {
		rec.Peer, _ = c.servers.ServedBy(rec.ID)
	}
	c.clients.Add(rec)
	return rec
}

// slowConn is how long a connection runs before the sockets of the hosts
// on its way are recorded (dumpSockets), or two thirds of its bound if
// that is less: far longer than any connection the soak sizes for its
// links, short of its bound.
const slowConn = 30 * time.Second

// maxSocketDumps bounds the files dumpSockets writes per cluster for slow
// connections; faults not recovered from are few, and always dumped.
const maxSocketDumps = 100

// dumpSockets records the TCP sockets (ss -tiem) of hosts, for a
// connection that runs long or a fault its hosts do not recover from, in
// the cluster's directory (slow-NAME.txt; kept with TCPPROXY_E2E_KEEP):
// the session connections' queues, windows and retransmission state say
// where it stalls.
func (c *cluster) dumpSockets(name, title string, hosts []*host) {
	if c.closing() {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s, at %s\n", title, time.Now().Format("15:04:05.000"))
	for _, h := range hosts {
		out, err := h.Exec("ss", "-tiemn")
		fmt.Fprintf(&b, "=== %s (err %v)\n", h.spec.iid, err)
		for line := range strings.Lines(string(out)) {
			if !strings.Contains(line, "cgroup2 mount") { // ss's complaint, once per socket
				b.WriteString(line)
			}
		}
	}
	_ = os.WriteFile(filepath.Join(c.dir, "slow-"+name+".txt"), []byte(b.String()), 0o644)
}

// serverHosts returns the hosts a connection along r may end at.
func (c *cluster) serverHosts(r route) []*host {
	if r.to != nil {
		return []*host{r.to}
	}
	var hs []*host
	for _, h := range c.hosts {
		if h.spec.server {
			hs = append(hs, h)
		}
	}
	return hs
}

// quick runs a small echo connection along r.
func (c *cluster) quick(r route) legacy.Record {
	return c.run(r, legacy.ClientSpec{Mode: legacy.Echo, Frames: 20, MinSize: 1, MaxSize: 4096, Bound: 15 * time.Second})
}

// serverRecord returns the server side of connection id.
func (c *cluster) serverRecord(id uint64) (legacy.Record, bool) {
	for _, r := range c.servers.Records() {
		if r.ID == id {
			return r, true
		}
	}
	return legacy.Record{}, false
}

// waitServersIdle waits until no legacy server has an open connection.
func (c *cluster) waitServersIdle(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var open []string
		for _, h := range c.hosts {
			if n := h.server.Active(); n > 0 {
				open = append(open, fmt.Sprintf("%s:%d", h.spec.iid, n))
			}
		}
		if len(open) == 0 {
			return
		}
		if time.Now().After(deadline) {
			c.t.Errorf("server connections still open %v after the clients finished (a hang): %v", d, open)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stream is a client connection running in the background.
type stream struct {
	r    route
	id   uint64
	done chan legacy.Record
	rec  *legacy.Record
}

// start runs spec along r in the background.
func (c *cluster) start(r route, spec legacy.ClientSpec) *stream {
	spec.ID = c.nextID.Add(1)
	s := &stream{r: r, id: spec.ID, done: make(chan legacy.Record, 1)}
	go func() { s.done <- c.run(r, spec) }()
	return s
}

// wait returns the stream's client record, failing the test if it takes
// longer than d.
func (s *stream) wait(t *testing.T, d time.Duration) legacy.Record {
	t.Helper()
	if s.rec != nil {
		return *s.rec
	}
	select {
	case rec := <-s.done:
		s.rec = &rec
		return rec
	case <-time.After(d):
		require.FailNow(t, "client connection still running", "%v #%d after %v", s.r, s.id, d)
		return legacy.Record{}
	}
}

// waitServed waits until a server has read the hello of every stream, and
// returns each stream's server host.
func (c *cluster) waitServed(t *testing.T, streams []*stream, d time.Duration) map[*stream]string {
	t.Helper()
	served := make(map[*stream]string)
	require.Eventually(t, func() bool {
		for _, s := range streams {
			if h, ok := c.servers.ServedBy(s.id); ok {
				served[s] = h
			}
		}
		return len(served) == len(streams)
	}, d, 10*time.Millisecond, "streams never reached their servers")
	return served
}
