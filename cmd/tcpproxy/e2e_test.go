package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// These tests run two `tcpproxy run` processes joined by a static member
// file, each with the defaults of a real deployment (loopback network,
// 127.0.0.0/16 and 127.1.0.0/16), and carry a real protocol through them.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// tcpproxyBinary builds the command once per test run.
func tcpproxyBinary(t *testing.T) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tcpproxy-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "tcpproxy")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

// freePort returns a port of 127.0.0.1 that nobody listens on and that no
// earlier call returned: the kernel may hand out a port again once its
// probe listener is closed, and a test that asks for an admin port and a
// listen port must get two.
func freePort(t *testing.T) int {
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		require.NoError(t, err)
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
}

var (
	portsMu    sync.Mutex
	portsGiven = make(map[int]bool)
)

// proc is a running tcpproxy process.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

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

func startProc(t *testing.T, env []string, args ...string) *proc {
	return startProcWith(t, tcpproxyBinary(t), env, args...)
}

// startProcWith runs name (tcpproxy itself, or a wrapper such as
// `ip netns exec` that execs it) with args.
func startProcWith(t *testing.T, name string, env []string, args ...string) *proc {
	cmd := exec.Command(name, args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), env...)
	require.NoError(t, cmd.Start())
	p := &proc{cmd: cmd, out: out, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// stop sends SIGTERM and checks for a clean exit after a drain.
func (p *proc) stop(t *testing.T) string {
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-p.done:
		require.NoError(t, err, "tcpproxy exit:\n%s", p.out.String())
	case <-time.After(30 * time.Second):
		require.FailNow(t, "tcpproxy did not exit after SIGTERM", p.out.String())
	}
	return p.out.String()
}

// twoInstances writes the configs of a reply instance "srv-1" and a
// request instance "cli-1" for channel name on port, and returns their
// paths.
func twoInstances(t *testing.T, name string, port int) (serverCfg, clientCfg string) {
	return twoInstancesIn(t, t.TempDir(), name, port, nil)
}

// twoInstancesIn is twoInstances writing into dir, with extra YAML lines
// per instance iid.
func twoInstancesIn(t *testing.T, dir, name string, port int, extra map[string]string) (serverCfg, clientCfg string) {
	sPort, cPort := freePort(t), freePort(t)
	// Every instance is a member, the client too: a proxy takes sessions
	// only from members.
	members := fmt.Sprintf("members:\n  - {iid: srv-1, role: server, addr: \"127.0.0.1:%d\", channels: {%s: %d}}\n"+
		"  - {iid: cli-1, role: client, addr: \"127.0.0.1:%d\"}\n", sPort, name, port, cPort)
	membersPath := filepath.Join(dir, "members.yaml")
	require.NoError(t, os.WriteFile(membersPath, []byte(members), 0o600))
	write := func(file, body string) string {
		p := filepath.Join(dir, file)
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		return p
	}
	serverCfg = write("server.yaml", fmt.Sprintf(`iid: srv-1
role: server
listen: 127.0.0.1:%d
members: {file: %s, poll: 100ms}
channels:
  %s: {kind: reply, port: %d}
drainTimeout: 2s
legacy: {stopTimeout: 5s}
%s`, sPort, membersPath, name, port, extra["srv-1"]))
	clientCfg = write("client.yaml", fmt.Sprintf(`iid: cli-1
role: client
listen: 127.0.0.1:%d
members: {file: %s, poll: 100ms}
channels:
  %s: {kind: request, port: %d}
drainTimeout: 2s
%s`, cPort, membersPath, name, port, extra["cli-1"]))
	return serverCfg, clientCfg
}

// defaultIP is the address a proxy with default ranges gives iid after
// its own (self first, as the proxy does).
func defaultIP(t *testing.T, self, iid string) string {
	a := proxy.NewInstanceAllocator(proxy.DefaultInstanceRange)
	_, err := a.Add(self)
	require.NoError(t, err)
	ip, err := a.Add(iid)
	require.NoError(t, err)
	return ip.String()
}

// TestTwoProcessesHTTP runs HTTP through two proxies on this host, whose
// sessions take the same-host Unix socket (the default).
func TestTwoProcessesHTTP(t *testing.T) {
	testTwoProcessesHTTP(t, t.TempDir(), nil, "unix")
}

// TestTwoProcessesHTTPOverTCP is TestTwoProcessesHTTP with the same-host
// socket turned off on the dialing side: its sessions go over TCP.
func TestTwoProcessesHTTPOverTCP(t *testing.T) {
	testTwoProcessesHTTP(t, t.TempDir(), map[string]string{"cli-1": "transport: {sameHost: tcp}\n"}, "tcp")
}

// TestTwoProcessesHTTPMutualTLS runs the same traffic over mutual TLS with
// certificates from `tcpproxy certs`.
func TestTwoProcessesHTTPMutualTLS(t *testing.T) {
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	code := realMain([]string{"certs", "-dir", dir, "srv-1:server", "cli-1:client"}, &out, &errOut)
	require0(t, code, out.String()+errOut.String())
	tlsLine := func(iid string) string {
		return fmt.Sprintf("tls: {cert: %s/%s.pem, key: %s/%s-key.pem, ca: %s/ca.pem}\n", dir, iid, dir, iid, dir)
	}
	testTwoProcessesHTTP(t, dir, map[string]string{"srv-1": tlsLine("srv-1"), "cli-1": tlsLine("cli-1")}, "unix")
}

// testTwoProcessesHTTP checks an HTTP exchange, the client's metrics and
// both logs; wantNet is the sessions' network ("unix" or "tcp").
func testTwoProcessesHTTP(t *testing.T, dir string, extra map[string]string, wantNet string) {
	other := map[string]string{"unix": "tcp", "tcp": "unix"}[wantNet]
	const port = 18080
	if extra == nil {
		extra = map[string]string{}
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	extra["cli-1"] += "admin: " + admin + "\n"
	serverCfg, clientCfg := twoInstancesIn(t, dir, "api", port, extra)
	server := startProc(t, []string{"TCPPROXY_TEST_LEGACY=http"}, "run", "-config", serverCfg, "--", os.Args[0])
	client := startProc(t, nil, "run", "-config", clientCfg)

	url := fmt.Sprintf("http://127.1.0.1:%d/through/the/proxy", port)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var body string
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		resp, err := hc.Get(url)
		if !assert.NoError(c, err) {
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		assert.NoError(c, err)
		assert.Equal(c, http.StatusOK, resp.StatusCode)
		body = string(b)
	}, 20*time.Second, 50*time.Millisecond, "server log:\n%s\nclient log:\n%s", server.out, client.out)
	callerIP := defaultIP(t, "srv-1", "cli-1")
	assert.Contains(t, body, "hello from srv-1, caller "+callerIP+":")
	assert.Contains(t, body, "path /through/the/proxy")

	// The client's admin endpoint: ready, and metrics that count what
	// just crossed it.
	resp, err := hc.Get("http://" + admin + "/readyz")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	// The proxy counts bytes once its write to the legacy socket returned,
	// which may be just after the HTTP client read them: wait for the
	// counters rather than race them.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		resp, err := hc.Get("http://" + admin + "/metrics")
		if !assert.NoError(c, err) {
			return
		}
		metricsText, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.NoError(c, err)
		for _, re := range []string{
			`tcpproxy_connections_total\{channel="api",iid="cli-1",kind="request"\} [1-9]`,
			`tcpproxy_bytes_total\{channel="api",direction="in",iid="cli-1",kind="request"\} [1-9]`,
			`tcpproxy_handshake_seconds_count\{iid="cli-1",result="ok",side="dial"\} [1-9]`,
			`tcpproxy_sessions\{iid="cli-1",net="` + wantNet + `"\} 2`, // transport.sessions' default
			`tcpproxy_sessions\{iid="cli-1",net="` + other + `"\} 0`,
			`go_goroutines `,
		} {
			assert.Regexp(c, re, string(metricsText))
		}
	}, 10*time.Second, 20*time.Millisecond)

	clientLog := client.stop(t)
	serverLog := server.stop(t)
	for _, log := range []string{clientLog, serverLog} {
		assert.Contains(t, log, "event ready")
		assert.Contains(t, log, "event close")
		assert.Regexp(t, `msg="session up".* net=`+wantNet+` `, log)
		assert.NotRegexp(t, `msg="session up".* net=`+other+` `, log)
	}
	assert.Contains(t, serverLog, "legacy program started")
	assert.Contains(t, serverLog, "legacy program stopped")
}

func TestTwoProcessesRedis(t *testing.T) {
	for _, tool := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (.ci/run installs it): %v", tool, err)
		}
	}
	const port = 16379
	serverCfg, clientCfg := twoInstances(t, "cache", port)
	server := startProc(t, nil, "run", "-config", serverCfg, "--", "sh", "-c",
		`exec redis-server --bind "$TCPPROXY_CACHE_IP" --port "$TCPPROXY_CACHE_PORT" --save "" --appendonly no --protected-mode no`)
	client := startProc(t, nil, "run", "-config", clientCfg)

	cli := func(stdin []byte, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "redis-cli", append([]string{"-h", "127.1.0.1", "-p", fmt.Sprint(port)}, args...)...)
		cmd.Stdin = bytes.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		out, err := cli(nil, "PING")
		assert.NoError(c, err)
		assert.Equal(c, "PONG", out)
	}, 20*time.Second, 50*time.Millisecond, "server log:\n%s\nclient log:\n%s", server.out, client.out)

	out, err := cli(nil, "SET", "greeting", "hello-through-tcpproxy")
	require.NoError(t, err)
	require.Equal(t, "OK", out)
	out, err = cli(nil, "GET", "greeting")
	require.NoError(t, err)
	require.Equal(t, "hello-through-tcpproxy", out)

	// A 1 MiB value (hex of 512 KiB random) crosses both proxies intact.
	raw := make([]byte, 512<<10)
	_, _ = rand.Read(raw)
	big := hex.EncodeToString(raw)
	out, err = cli([]byte(big), "-x", "SET", "big")
	require.NoError(t, err)
	require.Equal(t, "OK", out)
	out, err = cli(nil, "GET", "big")
	require.NoError(t, err)
	require.Equal(t, big, out)

	// The server sees the client instance's IP.
	out, err = cli(nil, "CLIENT", "LIST")
	require.NoError(t, err)
	assert.Contains(t, out, "addr="+defaultIP(t, "srv-1", "cli-1")+":")

	// redis-benchmark through the proxies: 50 concurrent clients, each
	// request its own proxied connection pipeline; every request must
	// succeed and the data must be there afterwards.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bench := exec.CommandContext(ctx, "redis-benchmark", "-h", "127.1.0.1", "-p", fmt.Sprint(port),
		"-n", "5000", "-c", "50", "-r", "1000", "-d", "64", "-t", "set,get", "-q")
	benchOut, err := bench.CombinedOutput()
	require.NoError(t, err, "%s", benchOut)
	t.Logf("redis-benchmark through tcpproxy:\n%s", benchOut)
	assert.Regexp(t, `SET: [0-9.]+ requests per second`, string(benchOut))
	assert.Regexp(t, `GET: [0-9.]+ requests per second`, string(benchOut))
	assert.NotContains(t, string(benchOut), "Error")
	out, err = cli(nil, "DBSIZE")
	require.NoError(t, err)
	n, err := strconv.Atoi(out)
	require.NoError(t, err, "DBSIZE answer %q", out)
	assert.Greater(t, n, 500, "keys written by redis-benchmark (-r 1000) plus ours")
	out, err = cli(nil, "--scan", "--pattern", "key:*")
	require.NoError(t, err)
	key := strings.Fields(out)[0]
	out, err = cli(nil, "STRLEN", key)
	require.NoError(t, err)
	assert.Equal(t, "64", out, "value size written by redis-benchmark -d 64 for %s", key)

	client.stop(t)
	server.stop(t)
}

func TestRunSignalsLegacyOnMembershipChange(t *testing.T) {
	dir := t.TempDir()
	membersPath := filepath.Join(dir, "members.yaml")
	marks := filepath.Join(dir, "marks")
	envDump := filepath.Join(dir, "env")
	port := freePort(t)
	writeMembers := func(extra string) {
		body := fmt.Sprintf("members:\n  - {iid: peer-a, role: peer, addr: \"127.0.0.1:%d\", channels: {ring: 19000}}\n%s", port, extra)
		tmp := membersPath + ".tmp"
		require.NoError(t, os.WriteFile(tmp, []byte(body), 0o600))
		require.NoError(t, os.Rename(tmp, membersPath))
	}
	writeMembers("")
	cfgPath := filepath.Join(dir, "a.yaml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(fmt.Sprintf(`iid: peer-a
role: peer
listen: 127.0.0.1:%d
addressing: {instanceRange: 127.60.0.0/16, requestRange: 127.61.0.0/16}
members: {file: %s, poll: 50ms}
channels:
  ring: {kind: duplex, port: 19000, mode: connect}
legacy: {onChange: SIGHUP, stopTimeout: 5s}
drainTimeout: 2s
`, port, membersPath)), 0o600))
	// The legacy program records its environment, then a line per SIGHUP.
	script := fmt.Sprintf(`env | grep ^TCPPROXY_ | sort > %s; trap 'echo hup >> %s' HUP; while :; do sleep 0.05; done`, envDump, marks)
	p := startProc(t, nil, "run", "-config", cfgPath, "--", "sh", "-c", script)

	require.EventuallyWithT(t, func(c *assert.CollectT) {
		env, err := os.ReadFile(envDump)
		assert.NoError(c, err)
		assert.Contains(c, string(env), "TCPPROXY_IID=peer-a")
		assert.Contains(c, string(env), "TCPPROXY_RING_MEMBERS=peer-a=")
		assert.Contains(c, string(env), "TCPPROXY_RING_PORT=19000")
	}, 20*time.Second, 20*time.Millisecond, "log:\n%s", p.out)
	_, err := os.Stat(marks)
	require.True(t, os.IsNotExist(err), "no SIGHUP before any membership change")

	writeMembers("  - {iid: peer-b, role: peer, addr: \"127.0.0.1:1\", channels: {ring: 19000}}\n")
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		got, err := os.ReadFile(marks)
		assert.NoError(c, err)
		assert.Equal(c, "hup\n", string(got))
	}, 20*time.Second, 20*time.Millisecond, "log:\n%s", p.out)
	log := p.stop(t)
	assert.Contains(t, log, "peer-b=127.60.")
}

// TestTwoProcessesPostgres runs PostgreSQL behind a reply channel and
// pgbench through the request channel.
func TestTwoProcessesPostgres(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run postgres as its own user")
	}
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	if len(bins) == 0 {
		t.Skip("postgresql is not installed (.ci/run installs it)")
	}
	pgBin := bins[len(bins)-1]
	for _, tool := range []string{"pgbench", "psql", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Skipf("no postgres user: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	base, err := os.MkdirTemp("", "tcpproxy-pg")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	require.NoError(t, os.Chmod(base, 0o755))
	data := filepath.Join(base, "data")
	require.NoError(t, os.Mkdir(data, 0o700))
	require.NoError(t, os.Chown(data, uid, gid))
	asPostgres := func(args ...string) []string {
		return append([]string{"setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"}, args...)
	}
	initdb := asPostgres(filepath.Join(pgBin, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
	out, err := exec.Command(initdb[0], initdb[1:]...).CombinedOutput()
	require.NoError(t, err, "initdb: %s", out)
	hba, err := os.OpenFile(filepath.Join(data, "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = hba.WriteString("host all all 127.0.0.0/8 trust\n") // callers come from instance IPs
	require.NoError(t, err)
	require.NoError(t, hba.Close())

	const port = 15432
	serverCfg, clientCfg := twoInstances(t, "db", port)
	pgCmd := strings.Join(asPostgres(filepath.Join(pgBin, "postgres"), "-D", data, "-k", data,
		"-c", "fsync=off", "-c", "listen_addresses=$TCPPROXY_DB_IP", "-p", "$TCPPROXY_DB_PORT"), " ")
	server := startProc(t, nil, "run", "-config", serverCfg, "--", "sh", "-c", "exec "+pgCmd)
	client := startProc(t, nil, "run", "-config", clientCfg)

	conn := []string{"-h", "127.1.0.1", "-p", fmt.Sprint(port), "-U", "postgres"}
	run := func(name string, args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, name, append(append([]string(nil), conn...), args...)...).CombinedOutput()
		require.NoError(t, err, "%s %v: %s\nserver log:\n%s", name, args, out, server.out)
		return string(out)
	}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		out, err := exec.Command("psql", append(append([]string(nil), conn...), "-Atc", "select 1", "postgres")...).CombinedOutput()
		assert.NoError(c, err, "%s", out)
	}, 30*time.Second, 100*time.Millisecond, "server log:\n%s\nclient log:\n%s", server.out, client.out)

	run("pgbench", "-i", "-s", "1", "-q", "postgres")
	res := run("pgbench", "-c", "4", "-j", "2", "-t", "100", "postgres")
	t.Logf("pgbench through tcpproxy:\n%s", res)
	assert.Contains(t, res, "number of transactions actually processed: 400/400")
	assert.Contains(t, res, "number of failed transactions: 0")
	assert.Equal(t, "100000", strings.TrimSpace(run("psql", "-Atc", "select count(*) from pgbench_accounts", "postgres")))
	// The server saw the client instance's IP.
	assert.Contains(t, run("psql", "-Atc", "select client_addr from pg_stat_activity where pid = pg_backend_pid()", "postgres"),
		defaultIP(t, "srv-1", "cli-1"))

	client.stop(t)
	server.stop(t)
}

// TestTwoProcessesPeerKilledResets kills the reply proxy mid-stream: its
// peer, on this host, sees the same-host session end at once, and resets
// the client's legacy connection rather than ending it with a FIN, which
// would pass for a clean end of stream.
func TestTwoProcessesPeerKilledResets(t *testing.T) {
	const port = 17070
	srvIP, err := proxy.NewInstanceAllocator(proxy.DefaultInstanceRange).Add("srv-1")
	require.NoError(t, err)
	serveEcho(t, net.JoinHostPort(srvIP.String(), strconv.Itoa(port))) // the legacy server

	serverCfg, clientCfg := twoInstances(t, "echo", port)
	server := startProc(t, nil, "run", "-config", serverCfg)
	client := startProc(t, nil, "run", "-config", clientCfg)
	var conn net.Conn
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		cn, err := net.DialTimeout("tcp4", net.JoinHostPort("127.1.0.1", strconv.Itoa(port)), time.Second)
		if !assert.NoError(c, err) {
			return
		}
		_ = cn.SetDeadline(time.Now().Add(2 * time.Second))
		got := make([]byte, 4)
		_, err = cn.Write([]byte("ping"))
		if err == nil {
			_, err = io.ReadFull(cn, got)
		}
		if !assert.NoError(c, err) || !assert.Equal(c, "ping", string(got)) {
			cn.Close()
			return
		}
		conn = cn
	}, 20*time.Second, 50*time.Millisecond, "server log:\n%s\nclient log:\n%s", server.out, client.out)
	defer conn.Close()

	require.NoError(t, server.cmd.Process.Kill())
	<-server.done
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = conn.Read(make([]byte, 1))
	require.ErrorIs(t, err, syscall.ECONNRESET, "client log:\n%s", client.out)
	assert.Regexp(t, `msg="session up".* net=unix `, client.stop(t))
}
