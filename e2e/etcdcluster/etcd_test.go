//go:build linux

package etcdcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
	"github.com/tcpproxy/tcpproxy/e2e/internal/proxybin"
	"github.com/tcpproxy/tcpproxy/proxy"
)

const (
	peerPort      = 2380 // duplex channel "peers": etcd's peer port
	clientPort    = 2379 // duplex channel "client": etcd's client port
	transportPort = 7000
	// waitLimit bounds each wait for the cluster (elections, catching up).
	waitLimit = 60 * time.Second
	// etcdctlTimeout bounds one etcdctl command.
	etcdctlTimeout = 15 * time.Second
)

var (
	subnet = netip.MustParsePrefix("10.214.0.0/24")
	iids   = []string{"etcd-0", "etcd-1", "etcd-2"}
)

// etcdScript is the legacy program: etcd configured from the environment
// tcpproxy gives it. $1 is the data directory. TCPPROXY_PEERS_MEMBERS is
// iid=ip:port,... (self included), which becomes --initial-cluster once
// every "=" is followed by "http://". With an existing data directory etcd
// ignores the --initial-* flags, so a restart uses the same command.
const etcdScript = `set -eu
cluster=$(printf '%s' "$TCPPROXY_PEERS_MEMBERS" | sed 's#=#=http://#g')
echo "e2e: $TCPPROXY_IID: etcd on peers $TCPPROXY_PEERS_IP:$TCPPROXY_PEERS_PORT, client $TCPPROXY_CLIENT_IP:$TCPPROXY_CLIENT_PORT, bind $TCPPROXY_BIND_IP, initial cluster $cluster" >&2
exec etcd --name "$TCPPROXY_IID" --data-dir "$1" \
  --listen-peer-urls "http://$TCPPROXY_PEERS_IP:$TCPPROXY_PEERS_PORT" \
  --initial-advertise-peer-urls "http://$TCPPROXY_PEERS_IP:$TCPPROXY_PEERS_PORT" \
  --listen-client-urls "http://$TCPPROXY_CLIENT_IP:$TCPPROXY_CLIENT_PORT,http://127.0.0.1:2379" \
  --advertise-client-urls "http://$TCPPROXY_CLIENT_IP:$TCPPROXY_CLIENT_PORT" \
  --initial-cluster "$cluster" --initial-cluster-token tcpproxy-e2e --initial-cluster-state new \
  --heartbeat-interval 200 --election-timeout 2000 \
  --logger zap --log-outputs stderr --log-level warn
`

func TestMain(m *testing.M) {
	code := m.Run()
	proxybin.Cleanup()
	os.Exit(code)
}

// requirements skips the test where it cannot run.
func requirements(t *testing.T) {
	t.Helper()
	if err := ns.Check(); err != nil {
		t.Skipf("the etcd cluster test needs root and iproute2 (CI runs it as root): %v", err)
	}
	for _, c := range []struct{ bin, pkg string }{{"etcd", "etcd-server"}, {"etcdctl", "etcd-client"}, {"sh", "dash"}, {"sed", "sed"}, {"ss", "iproute2"}, {"go", "golang"}} {
		if _, err := exec.LookPath(c.bin); err != nil {
			t.Skipf("%s is not installed (Debian package %s): %v", c.bin, c.pkg, err)
		}
	}
}

type cluster struct {
	t       *testing.T
	net     *ns.Net
	dir     string
	bin     string
	members []*member
}

// member is one host: a namespace with a tcpproxy running etcd.
type member struct {
	*ns.Host
	c   *cluster
	iid string
	// ip is the member's instance IP, the same in every namespace (every
	// proxy uses the default range and knows the same iids).
	ip                        netip.Addr
	cfgPath, logPath, dataDir string

	proc *proxybin.Process
	// stopped: the test stopped the proxy on purpose (waitFor does not
	// count it as a failure).
	stopped atomic.Bool
}

func (m *member) peerURL() string {
	return "http://" + netip.AddrPortFrom(m.ip, peerPort).String()
}

func (m *member) clientURL() string {
	return "http://" + netip.AddrPortFrom(m.ip, clientPort).String()
}

// newCluster creates the namespaces and starts every member's proxy
// (which starts etcd) and waits until every proxy is ready.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	requirements(t)
	c := &cluster{t: t, bin: proxybin.Path(t)}
	// The directory first: its removal is then the last cleanup, after
	// etcd has stopped.
	if os.Getenv("TCPPROXY_E2E_KEEP") != "" {
		var err error
		c.dir, err = os.MkdirTemp("", "tcpproxy-etcd-"+t.Name()+"-")
		require.NoError(t, err)
	} else {
		c.dir = t.TempDir()
	}
	var err error
	c.net, err = ns.NewNet(ns.RandomPrefix(), len(iids), subnet)
	require.NoError(t, err)
	// Cleanups run last-registered first: the namespaces' removal (which
	// also kills anything left in them) runs after the proxies stopped.
	t.Cleanup(func() {
		if err := c.net.Delete(); err != nil {
			t.Errorf("remove namespaces: %v", err)
		}
	})
	t.Logf("namespaces %s-*, files in %s, proxies built with race=%v", c.net.Prefix, c.dir, proxybin.Race())

	// The instance IPs as every proxy computes them.
	alloc := proxy.NewInstanceAllocator(proxy.DefaultInstanceRange)
	_, err = alloc.Ensure(iids...)
	require.NoError(t, err)

	var members strings.Builder
	members.WriteString("members:\n")
	for i, iid := range iids {
		h := c.net.Hosts[i]
		fmt.Fprintf(&members, "  - {iid: %s, role: etcd, addr: \"%s:%d\", channels: {peers: %d, client: %d}}\n",
			iid, h.Addr, transportPort, peerPort, clientPort)
		ip, ok := alloc.Lookup(iid)
		require.True(t, ok)
		m := &member{Host: h, c: c, iid: iid, ip: ip,
			cfgPath: filepath.Join(c.dir, iid+".yaml"),
			logPath: filepath.Join(c.dir, iid+".log"),
			dataDir: filepath.Join(c.dir, iid+".etcd"),
		}
		m.proc = proxybin.NewProcess(iid, m.logPath)
		c.members = append(c.members, m)
	}
	membersPath := filepath.Join(c.dir, "members.yaml")
	require.NoError(t, os.WriteFile(membersPath, []byte(members.String()), 0o644))
	// drainTimeout: after etcd exits, a connection it had half-closed
	// stays open until the remote etcd writes into it twice (the first
	// write draws an RST from the dead socket, the second fails in the
	// proxy); idle rafthttp streams write a link heartbeat every ~1.7s, so
	// draining takes up to ~3.5s and a 2s drain ends in resets (exit 1).
	for _, m := range c.members {
		cfg := fmt.Sprintf(`iid: %s
role: etcd
listen: %s:%d
network: loopback
members: {file: %s}
channels:
  peers:  {kind: duplex, port: %d, mode: both}
  client: {kind: duplex, port: %d, mode: both}
legacy: {onChange: ignore, stopTimeout: 15s}
transport: {insecure: true}
drainTimeout: 10s
log: {level: %s}
`, m.iid, m.Addr, transportPort, membersPath, peerPort, clientPort, proxybin.LogLevel())
		require.NoError(t, os.WriteFile(m.cfgPath, []byte(cfg), 0o644))
	}

	t.Cleanup(c.shutdown)
	for _, m := range c.members {
		m.start()
	}
	for _, m := range c.members {
		m.waitReady()
	}
	return c
}

// start starts the member's tcpproxy with etcd as its legacy program (not
// waiting for it to be ready).
func (m *member) start() {
	cmd := m.Command(m.c.bin, "run", "-config", m.cfgPath, "--", "sh", "-c", etcdScript, "etcd-"+m.iid, m.dataDir)
	require.NoError(m.c.t, m.proc.Start(cmd))
	m.stopped.Store(false)
}

// waitReady waits until the proxy started last logs that it is ready.
func (m *member) waitReady() {
	t := m.c.t
	t.Helper()
	if m.proc.WaitLog(`msg="proxy ready"`, 30*time.Second) {
		return
	}
	if m.proc.Exited() {
		require.FailNow(t, "proxy exited before it was ready", "%s: %v\n%s", m.iid, m.proc.Err(), m.proc.Tail(60))
	}
	require.FailNow(t, "proxy not ready in 30s", "%s:\n%s", m.iid, m.proc.Tail(60))
}

// stop sends SIGTERM to the member's proxy, which stops etcd and then
// drains, and waits until it exited.
func (m *member) stop() {
	t := m.c.t
	t.Helper()
	m.terminate()
	if !m.proc.Wait(30 * time.Second) {
		require.FailNow(t, "proxy did not exit 30s after SIGTERM", "%s:\n%s", m.iid, m.proc.Tail(60))
	}
	require.NoError(t, m.proc.Err(), "%s: exit status of the proxy after SIGTERM:\n%s", m.iid, m.proc.Tail(60))
}

// terminate sends SIGTERM to the member's proxy.
func (m *member) terminate() {
	m.stopped.Store(true)
	_ = m.proc.Signal(syscall.SIGTERM)
}

// waitEtcdStopped waits at most limit until the proxy logged that its
// legacy program (etcd) stopped, or exited.
func (m *member) waitEtcdStopped(limit time.Duration) {
	m.proc.WaitLog(`msg="legacy program stopped"`, limit)
}

func (m *member) readLog() []byte {
	return m.proc.ReadLog()
}

// shutdown stops every proxy (SIGTERM, then SIGKILL), and fails the test
// if a proxy reported a data race or panicked. On failure it prints the
// end of every member's log (the proxy's and etcd's).
//
// The members are stopped one at a time, each once the previous etcd has
// exited: a leader that stops hands leadership to a follower and waits for
// it (up to 5s plus two election timeouts), which never completes if that
// follower is stopping too. Their proxies then drain together.
func (c *cluster) shutdown() {
	t := c.t
	var running []*member
	for _, m := range c.members {
		if m.proc.Running() {
			running = append(running, m)
		}
	}
	for _, m := range running {
		m.terminate()
		m.waitEtcdStopped(20 * time.Second)
	}
	var wg sync.WaitGroup
	for _, m := range running {
		wg.Go(func() {
			if !m.proc.Wait(30 * time.Second) {
				t.Errorf("%s: proxy did not exit 30s after SIGTERM; killing it", m.iid)
				_ = m.proc.Kill()
				<-m.proc.Done()
			}
		})
	}
	wg.Wait()
	for _, m := range c.members {
		log := m.readLog()
		if i := bytes.Index(log, []byte("WARNING: DATA RACE")); i >= 0 {
			t.Errorf("%s: the proxy reported a data race:\n%s", m.iid, log[i:min(len(log), i+6000)])
		}
		if i := bytes.Index(log, []byte("panic:")); i >= 0 {
			t.Errorf("%s: a panic in the member's log:\n%s", m.iid, log[i:min(len(log), i+6000)])
		}
		if t.Failed() {
			t.Logf("--- end of %s's log (%s):\n%s", m.iid, m.logPath, proxybin.Tail(log, 60))
		}
	}
}

// etcdctl runs etcdctl inside the member's namespace against its own etcd
// (127.0.0.1:2379) and returns its standard output.
func (m *member) etcdctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), etcdctlTimeout)
	defer cancel()
	full := append([]string{"netns", "exec", m.Name, "etcdctl",
		"--endpoints", "http://127.0.0.1:2379", "--dial-timeout", "3s", "--command-timeout", "5s"}, args...)
	cmd := exec.CommandContext(ctx, "ip", full...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s: etcdctl %s: %w: %s%s", m.iid, strings.Join(args, " "), err,
			strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// waitFor polls cond until it returns nil, failing the test after limit
// (with cond's last error) or as soon as a proxy exited on its own.
func (c *cluster) waitFor(what string, limit time.Duration, cond func() error) {
	t := c.t
	t.Helper()
	start := time.Now()
	deadline := start.Add(limit)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			t.Logf("%s: after %v", what, time.Since(start).Round(time.Millisecond))
			return
		}
		for _, m := range c.members {
			if !m.stopped.Load() && m.proc.Exited() {
				require.FailNow(t, "a proxy exited", "%s while waiting for %s: %v (last check: %v)", m.iid, what, m.proc.Err(), err)
			}
		}
		if time.Now().After(deadline) {
			require.FailNow(t, "timed out", "%s: not within %v: %v", what, limit, err)
		}
		<-tick.C
	}
}

// healthy checks from m's namespace that every member's etcd is healthy,
// reaching the other members' client ports through the "client" channel
// (their advertised client URLs are their instance IPs).
func (c *cluster) healthy(m *member) error {
	out, err := m.etcdctl("endpoint", "health", "--cluster", "-w", "json")
	if err != nil {
		return err
	}
	var hs []struct {
		Endpoint string `json:"endpoint"`
		Health   bool   `json:"health"`
		Error    string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &hs); err != nil {
		return fmt.Errorf("%s: endpoint health: %v: %q", m.iid, err, out)
	}
	var got, want []string
	for _, h := range hs {
		if !h.Health {
			return fmt.Errorf("%s: endpoint %s unhealthy: %s", m.iid, h.Endpoint, h.Error)
		}
		got = append(got, h.Endpoint)
	}
	for _, o := range c.members {
		want = append(want, o.clientURL())
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("%s: healthy endpoints %v, want %v", m.iid, got, want)
	}
	return nil
}

// allHealthy checks health from every member's namespace.
func (c *cluster) allHealthy() error {
	var errs []error
	for _, m := range c.members {
		errs = append(errs, c.healthy(m))
	}
	return errors.Join(errs...)
}

type memberInfo struct {
	ID         uint64   `json:"ID"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs"`
}

// memberList returns the members m's etcd knows, checking that all three
// have started (have a name) with the peer and client URLs of their
// instance IPs.
func (c *cluster) memberList(m *member) (map[string]memberInfo, error) {
	out, err := m.etcdctl("member", "list", "-w", "json")
	if err != nil {
		return nil, err
	}
	var ml struct {
		Members []memberInfo `json:"members"`
	}
	if err := json.Unmarshal([]byte(out), &ml); err != nil {
		return nil, fmt.Errorf("%s: member list: %v: %q", m.iid, err, out)
	}
	byName := make(map[string]memberInfo)
	for _, mi := range ml.Members {
		if mi.Name == "" {
			return nil, fmt.Errorf("%s: member %x has not started: %s", m.iid, mi.ID, out)
		}
		byName[mi.Name] = mi
	}
	if len(ml.Members) != len(c.members) {
		return nil, fmt.Errorf("%s: %d members, want %d: %s", m.iid, len(ml.Members), len(c.members), out)
	}
	for _, o := range c.members {
		mi, ok := byName[o.iid]
		if !ok {
			return nil, fmt.Errorf("%s: no member %s: %s", m.iid, o.iid, out)
		}
		if !slices.Equal(mi.PeerURLs, []string{o.peerURL()}) || !slices.Equal(mi.ClientURLs, []string{o.clientURL()}) {
			return nil, fmt.Errorf("%s: member %s has peer URLs %v and client URLs %v, want [%s] and [%s]",
				m.iid, o.iid, mi.PeerURLs, mi.ClientURLs, o.peerURL(), o.clientURL())
		}
	}
	return byName, nil
}

// get reads key on m: a linearizable read (through the leader's read
// index, then from m's own store) or, when serializable, m's store alone.
func (m *member) get(key string, serializable bool) (string, error) {
	args := []string{"get", key, "--print-value-only"}
	if serializable {
		args = append(args, "--consistency", "s")
	}
	out, err := m.etcdctl(args...)
	return strings.TrimSpace(out), err
}

// readEverywhere waits until every member returns value for key, both
// from its own store (serializable) and linearizably.
func (c *cluster) readEverywhere(key, value string) {
	c.t.Helper()
	for _, m := range c.members {
		c.waitFor(fmt.Sprintf("%s reads %s", m.iid, key), waitLimit, func() error {
			for _, s := range []bool{true, false} {
				got, err := m.get(key, s)
				if err != nil {
					return err
				}
				if got != value {
					return fmt.Errorf("%s: %s = %q (serializable %v), want %q", m.iid, key, got, s, value)
				}
			}
			return nil
		})
	}
}

// leader returns the member that m's etcd reports as the leader.
func (c *cluster) leader(m *member) (*member, error) {
	out, err := m.etcdctl("endpoint", "status", "-w", "json")
	if err != nil {
		return nil, err
	}
	var st []struct {
		Status struct {
			Leader uint64 `json:"leader"`
		} `json:"Status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st) != 1 {
		return nil, fmt.Errorf("%s: endpoint status: %v: %q", m.iid, err, out)
	}
	byName, err := c.memberList(m)
	if err != nil {
		return nil, err
	}
	for _, o := range c.members {
		if byName[o.iid].ID == st[0].Status.Leader {
			return o, nil
		}
	}
	return nil, fmt.Errorf("%s: leader %x is not a member", m.iid, st[0].Status.Leader)
}

// peerSources returns the source IPs of the established connections to
// m's etcd peer port, as seen in m's namespace.
func (m *member) peerSources() (map[netip.Addr]int, error) {
	local := netip.AddrPortFrom(m.ip, peerPort).String()
	out, err := m.Exec("ss", "-Htn", "state", "established", "( sport = :"+fmt.Sprint(peerPort)+" )")
	if err != nil {
		return nil, err
	}
	srcs := make(map[netip.Addr]int)
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 4 || f[2] != local {
			continue
		}
		ap, err := netip.ParseAddrPort(f[3])
		if err != nil {
			return nil, fmt.Errorf("%s: ss: %v in %q", m.iid, err, line)
		}
		srcs[ap.Addr()]++
	}
	return srcs, nil
}

// checkPeersThroughProxies checks in every namespace that etcd's peer
// port has connections from each other member's instance IP: the
// connections the member's proxy opens for streams from the others'
// proxies (an etcd in another namespace cannot reach 127.0.0.0/8 here).
func (c *cluster) checkPeersThroughProxies() error {
	var errs []error
	for _, m := range c.members {
		srcs, err := m.peerSources()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, o := range c.members {
			if o != m && srcs[o.ip] == 0 {
				errs = append(errs, fmt.Errorf("%s: no peer connection from %s's instance IP %s (sources %v)", m.iid, o.iid, o.ip, srcs))
			}
		}
	}
	return errors.Join(errs...)
}

func (c *cluster) put(m *member, key, value string) {
	c.t.Helper()
	// A put may fail while a leader is being elected; retry until it
	// succeeds (rewriting the same value is harmless).
	c.waitFor(fmt.Sprintf("put %s on %s", key, m.iid), waitLimit, func() error {
		_, err := m.etcdctl("put", key, value)
		return err
	})
}

func TestEtcdClusterOverDuplexChannels(t *testing.T) {
	start := time.Now()
	c := newCluster(t)
	t.Logf("proxies ready after %v; instance IPs: %s=%s %s=%s %s=%s", time.Since(start).Round(time.Millisecond),
		c.members[0].iid, c.members[0].ip, c.members[1].iid, c.members[1].ip, c.members[2].iid, c.members[2].ip)

	// 1. The cluster forms: every member is healthy from every namespace,
	// and every member lists the three with their instance-IP URLs.
	c.waitFor("cluster healthy", waitLimit, c.allHealthy)
	var ids map[string]memberInfo // etcd's member IDs, as etcd-0 lists them
	sameIDs := func(m *member) error {
		got, err := c.memberList(m)
		if err != nil {
			return err
		}
		if ids == nil {
			ids = got
		}
		for name, mi := range ids {
			if got[name].ID != mi.ID {
				return fmt.Errorf("%s: member %s has ID %x, etcd-0 said %x", m.iid, name, got[name].ID, mi.ID)
			}
		}
		return nil
	}
	for _, m := range c.members {
		c.waitFor(m.iid+" lists 3 started members", waitLimit, func() error { return sameIDs(m) })
	}
	c.waitFor("peer connections come from the callers' instance IPs", waitLimit, c.checkPeersThroughProxies)

	// 2. A key written on one member is read on the others.
	c.put(c.members[0], "/e2e/before", "written-on-etcd-0")
	c.readEverywhere("/e2e/before", "written-on-etcd-0")

	// 3. The leader is restarted: SIGTERM to its proxy stops etcd (which
	// hands leadership over through the proxies) and the proxy; the same
	// command starts it again on its data directory.
	var victim *member
	c.waitFor("a leader", waitLimit, func() error {
		var err error
		victim, err = c.leader(c.members[0])
		return err
	})
	t.Logf("restarting the leader %s", victim.iid)
	stopAt := time.Now()
	victim.stop()
	t.Logf("%s stopped in %v", victim.iid, time.Since(stopAt).Round(time.Millisecond))
	require.Contains(t, string(victim.readLog()), `msg="legacy program stopped"`)
	require.NotContains(t, string(victim.readLog()), "legacy program ignored SIGTERM", "etcd did not stop on SIGTERM")
	out, err := exec.Command("ip", "netns", "pids", victim.Name).Output()
	require.NoError(t, err)
	require.Empty(t, strings.TrimSpace(string(out)), "processes left in %s after its proxy exited", victim.Name)

	var others []*member
	for _, m := range c.members {
		if m != victim {
			others = append(others, m)
		}
	}
	// The two left elect a leader and keep serving writes.
	c.put(others[0], "/e2e/during", "written-while-"+victim.iid+"-was-down")

	victim.start()
	victim.waitReady()
	c.waitFor("cluster healthy after the restart", waitLimit, c.allHealthy)
	for _, m := range c.members {
		c.waitFor(m.iid+" lists the same 3 members after the restart", waitLimit, func() error { return sameIDs(m) })
	}
	c.waitFor("peer connections after the restart", waitLimit, c.checkPeersThroughProxies)
	c.readEverywhere("/e2e/before", "written-on-etcd-0")
	c.readEverywhere("/e2e/during", "written-while-"+victim.iid+"-was-down")
	// Keys written after the restart, on another member and on the
	// restarted one, are replicated everywhere.
	c.put(others[1], "/e2e/after", "written-on-"+others[1].iid)
	c.readEverywhere("/e2e/after", "written-on-"+others[1].iid)
	c.put(victim, "/e2e/after-on-restarted", "written-on-"+victim.iid)
	c.readEverywhere("/e2e/after-on-restarted", "written-on-"+victim.iid)
	t.Logf("done in %v", time.Since(start).Round(time.Millisecond))
}
