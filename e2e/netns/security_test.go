//go:build linux

package netns

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
	"github.com/tcpproxy/tcpproxy/e2e/internal/proxybin"
)

// The hostile mesh: a cache host whose proxy runs redis-server behind a
// reply channel, a client host whose proxy offers it on a request
// channel, and a third host that is not a member and attacks both: as a
// stranger, as an impostor claiming each member's iid, and with a flood
// of failed handshakes.
const (
	cachePort    = 6379
	secAdminPort = 9090
)

var secSubnet = netip.MustParsePrefix("10.214.0.0/24")

// secMesh is the hostile mesh of one test.
type secMesh struct {
	t                *testing.T
	net              *ns.Net
	dir, bin         string
	cache, cli, evil *ns.Host
	procs            []*proxybin.Process
	// insecure sets transport.insecure; tls is each proxy's tls line, by
	// iid, when set; handshakeTimeout is transport.handshakeTimeout
	// (default 1s).
	insecure         bool
	tls              map[string]string
	handshakeTimeout string
	// cmds start each proxy again, by index in procs.
	cmds []func() *exec.Cmd
	// evilTLS, when set, wraps the attacker's connections in TLS.
	evilTLS func(c net.Conn, claim string) net.Conn
}

func requireRedis(t *testing.T) {
	t.Helper()
	for _, p := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (apt-get install redis-server redis-tools): %v", p, err)
		}
	}
}

// newSecMesh creates the three hosts and writes the membership; start
// starts the proxies once m.insecure or m.tls is set.
func newSecMesh(t *testing.T) *secMesh {
	t.Helper()
	requireNamespaces(t)
	requireRedis(t)
	m := &secMesh{t: t, bin: proxybin.Path(t), tls: map[string]string{}}
	var err error
	m.net, err = ns.NewNet(ns.RandomPrefix(), 3, secSubnet)
	require.NoError(t, err)
	t.Cleanup(func() {
		if err := m.net.Delete(); err != nil {
			t.Errorf("remove namespaces: %v", err)
		}
	})
	m.cache, m.cli, m.evil = m.net.Hosts[0], m.net.Hosts[1], m.net.Hosts[2]
	if os.Getenv("TCPPROXY_E2E_KEEP") != "" {
		m.dir, err = os.MkdirTemp("", "tcpproxy-e2e-"+strings.ReplaceAll(t.Name(), "/", "-")+"-")
		require.NoError(t, err)
	} else {
		m.dir = t.TempDir()
	}
	t.Logf("namespaces %s-*, files in %s", m.net.Prefix, m.dir)
	members := fmt.Sprintf(`members:
  - {iid: cache-1, role: cache, addr: "%s:%d", channels: {cache: %d}}
  - {iid: cli-1, role: client, addr: "%s:%d"}
`, m.cache.Addr, transportPort, cachePort, m.cli.Addr, transportPort)
	require.NoError(t, os.WriteFile(filepath.Join(m.dir, "members.yaml"), []byte(members), 0o644))
	return m
}

func (m *secMesh) start() {
	t := m.t
	write := func(iid, role string, h *ns.Host, channel string) string {
		cfg := fmt.Sprintf(`iid: %s
role: %s
listen: %s:%d
admin: 127.0.0.1:%d
members: {file: %s}
channels:
  cache: %s
transport: {handshakeTimeout: %s, insecure: %v}
%sdrainTimeout: 2s
log: {level: %s}
`, iid, role, h.Addr, transportPort, secAdminPort, filepath.Join(m.dir, "members.yaml"), channel, cmp.Or(m.handshakeTimeout, "1s"), m.insecure, m.tls[iid], proxybin.LogLevel())
		p := filepath.Join(m.dir, iid+".yaml")
		require.NoError(t, os.WriteFile(p, []byte(cfg), 0o644))
		return p
	}
	cacheCfg := write("cache-1", "cache", m.cache, fmt.Sprintf("{kind: reply, port: %d}", cachePort))
	cliCfg := write("cli-1", "client", m.cli, fmt.Sprintf("{kind: request, port: %d}", cachePort))
	redis := `exec redis-server --bind "$TCPPROXY_CACHE_IP" --port "$TCPPROXY_CACHE_PORT" --save "" --appendonly no --protected-mode no`
	for _, s := range []struct {
		h    *ns.Host
		name string
		args []string
	}{
		{m.cache, "cache-1", []string{"run", "-config", cacheCfg, "--", "sh", "-c", redis}},
		{m.cli, "cli-1", []string{"run", "-config", cliCfg}},
	} {
		p := proxybin.NewProcess(s.name, filepath.Join(m.dir, s.name+".log"))
		cmd := func() *exec.Cmd { return s.h.Command(m.bin, s.args...) }
		require.NoError(t, p.Start(cmd()))
		m.procs = append(m.procs, p)
		m.cmds = append(m.cmds, cmd)
	}
	t.Cleanup(func() {
		for _, p := range m.procs {
			if !p.Stop(10 * time.Second) {
				t.Errorf("%s: proxy did not exit 10s after SIGTERM", p.LogPath())
			}
			log := p.ReadLog()
			for _, bad := range []string{"WARNING: DATA RACE", "panic:"} {
				if i := strings.Index(string(log), bad); i >= 0 {
					t.Errorf("%s: %s\n%s", p.LogPath(), bad, log[i:min(len(log), i+6000)])
				}
			}
			if t.Failed() {
				t.Logf("--- end of %s:\n%s", p.LogPath(), p.Tail(40))
			}
		}
	})
	for _, p := range m.procs {
		if !p.WaitLog(`msg="proxy ready"`, 30*time.Second) {
			require.FailNow(t, "proxy not ready", "%s:\n%s", p.LogPath(), p.Tail(40))
		}
	}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		out, err := m.redis("PING")
		assert.NoError(c, err)
		assert.Equal(c, "PONG", out)
	}, 30*time.Second, 100*time.Millisecond, "redis through the proxies")
}

// redis runs redis-cli on the client host, through its proxy's request
// channel.
func (m *secMesh) redis(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", m.cli.Name, "redis-cli", "-h", requestIP, "-p", strconv.Itoa(cachePort)}, args...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// attack is the result of one hostile handshake.
type attack struct {
	accepted bool
	reason   string // the refusal, or the error that ended the handshake
	// Streams the proxy sent to the attacker on an accepted session.
	streams atomic.Int64
	// answers are what a legacy server answered the attacker's PING.
	answers []string
}

// handshake connects from the evil host to the proxy at to, claims to be
// hello, and, if accepted, keeps the session for the rest of the test:
// it counts the streams the proxy sends on it, and when the proxy serves
// channel, it opens a stream there and sends a Redis PING.
func (m *secMesh) handshake(to *ns.Host, hello wire.Hello, channel string) *attack {
	t := m.t
	a := &attack{}
	raw, err := m.evil.Dial(fmt.Sprintf("%s:%d", to.Addr, transportPort), 5*time.Second)
	require.NoError(t, err)
	var c net.Conn = raw
	if m.evilTLS != nil {
		c = m.evilTLS(raw, hello.IID)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wire.WriteHello(c, hello); err != nil {
		a.reason = err.Error()
		return a
	}
	rp, err := wire.ReadReply(c)
	switch {
	case err != nil:
		a.reason = err.Error()
		return a
	case !rp.Accepted:
		a.reason = rp.Reason
		return a
	}
	a.accepted = true
	_ = c.SetDeadline(time.Time{})
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			st, err := sess.AcceptStream(context.Background())
			if err != nil {
				return
			}
			a.streams.Add(1)
			st.Reset()
		}
	}()
	t.Cleanup(func() { sess.Close(); <-done })
	if channel == "" {
		return a
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := sess.OpenStream(ctx)
	require.NoError(t, err)
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(5 * time.Second))
	h, err := wire.AppendStreamHeader(nil, wire.StreamHeader{Channel: channel, SourceIID: hello.IID, SourcePort: 40000, TargetPort: cachePort})
	require.NoError(t, err)
	if _, err := st.Write(append(h, "PING\r\n"...)); err == nil {
		if line, err := bufio.NewReader(st).ReadString('\n'); err == nil {
			a.answers = append(a.answers, strings.TrimSpace(line))
		}
	}
	return a
}

// metrics reads a proxy's /metrics from inside its host.
func (m *secMesh) metrics(h *ns.Host) string {
	t := m.t
	client := m.adminClient(h)
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", secAdminPort))
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(body)
}

// adminClient returns an HTTP client of the admin endpoints in host h.
// It keeps no connection open: the flood test counts the proxy's file
// descriptors.
func (m *secMesh) adminClient(h *ns.Host) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext:       func(_ context.Context, _, addr string) (net.Conn, error) { return h.Dial(addr, 5*time.Second) },
	}}
}

// metric returns the value of the series named by prefix (name and
// labels, as Prometheus prints them, without the iid label) in text.
func metric(text, name string, labels ...string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\{([^}]*)\} (\S+)$`)
	for _, mm := range re.FindAllStringSubmatch(text, -1) {
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(mm[1], l)
		}
		if ok {
			v, _ := strconv.ParseFloat(mm[2], 64)
			return v
		}
	}
	return -1
}

// keepWorking runs redis-cli through the client's proxy until stop is
// closed, and reports how many commands ran and the failures.
func (m *secMesh) keepWorking(stop <-chan struct{}) (wait func() (ok int, failures []string)) {
	var (
		done     = make(chan struct{})
		n        int
		failures []string
	)
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			key := fmt.Sprintf("k%d", i)
			out, err := m.redis("SET", key, "v"+key)
			if err == nil && out == "OK" {
				out, err = m.redis("GET", key)
			}
			if err != nil || out != "v"+key {
				failures = append(failures, fmt.Sprintf("%s: %q %v", key, out, err))
				continue
			}
			n++
		}
	}()
	return func() (int, []string) { <-done; return n, failures }
}

// checkAttacks runs the stranger and impostors against both proxies while
// the client keeps using redis, then a flood of failed handshakes, and
// checks that nothing got through and the proxies counted and logged it.
func (m *secMesh) checkAttacks(wantReason map[string]string) {
	t := m.t
	stop := make(chan struct{})
	wait := m.keepWorking(stop)

	cases := []struct {
		name    string
		to      *ns.Host
		hello   wire.Hello
		channel string
	}{
		{"stranger at the cache", m.cache, wire.Hello{IID: "evil", Role: "client"}, "cache"},
		{"impostor of the client at the cache", m.cache, wire.Hello{IID: "cli-1", Role: "client"}, "cache"},
		{"impostor of the cache at the client", m.cli, wire.Hello{IID: "cache-1", Role: "cache", Channels: []string{"cache"}}, ""},
		{"stranger at the client", m.cli, wire.Hello{IID: "evil", Role: "client", Channels: []string{"cache"}}, ""},
	}
	attacks := make([]*attack, len(cases))
	for i, c := range cases {
		attacks[i] = m.handshake(c.to, c.hello, c.channel)
		assert.False(t, attacks[i].accepted, "%s: accepted", c.name)
		assert.Contains(t, attacks[i].reason, wantReason[c.name], c.name)
		assert.Empty(t, attacks[i].answers, "%s: the legacy server answered", c.name)
	}
	// The client's own traffic while the impostor would be in place: 6 of
	// 6 pings answered by the real redis, none sent to the impostor.
	for range 6 {
		out, err := m.redis("PING")
		assert.NoError(t, err)
		assert.Equal(t, "PONG", out)
	}
	for i, c := range cases {
		assert.Zero(t, attacks[i].streams.Load(), "%s received streams", c.name)
	}

	// A flood of failed handshakes at the cache: idle connections that
	// time out and garbage, most of them closed at once (overload).
	const flood = 600
	var wg sync.WaitGroup
	for i := range flood {
		wg.Go(func() {
			c, err := m.evil.Dial(fmt.Sprintf("%s:%d", m.cache.Addr, transportPort), 5*time.Second)
			if errors.Is(err, syscall.ECONNRESET) {
				return // accepted and closed at once
			}
			if !assert.NoError(t, err) {
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if i%2 == 1 {
				_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
			}
			_, _ = io.Copy(io.Discard, c) // until the proxy hangs up
		})
	}
	wg.Wait()
	close(stop)
	ok, failures := wait()
	assert.Empty(t, failures, "the client's redis commands during the attacks")
	assert.Positive(t, ok)
	t.Logf("%d redis SET+GET through the proxies during the attacks", ok)

	// Every refusal is counted; the log has one line for the evil host.
	total := func() float64 {
		var sum float64
		text := m.metrics(m.cache)
		for _, r := range []string{channels.RefusedTimeout, channels.RefusedProtocol, channels.RefusedTLS, channels.RefusedIdentity,
			channels.RefusedNotMember, channels.RefusedAddress, channels.RefusedPlaintext, channels.RefusedOverload} {
			sum += metric(text, "tcpproxy_handshake_refused_total", `side="accept"`, `reason="`+r+`"`)
		}
		return sum
	}
	require.Eventually(t, func() bool { return total() == flood+2 }, 10*time.Second, 50*time.Millisecond,
		"refused handshakes at the cache: %v, want %d", total(), flood+2)
	log := string(m.procs[0].ReadLog())
	refusedLines := regexp.MustCompile(`msg="session refused".*remote=`+regexp.QuoteMeta(m.evil.Addr.String())+`:`).FindAllString(log, -1)
	assert.Len(t, refusedLines, 1, "one log line for the first refusal; the others are summed up later")
}

// TestHostileHostInsecure: with plaintext sessions (transport.insecure),
// a host that is not a member can neither join as a stranger nor pass for
// a member, and gets no stream meant for one.
func TestHostileHostInsecure(t *testing.T) {
	m := newSecMesh(t)
	m.insecure = true
	m.start()
	assert.Equal(t, 1.0, metric(m.metrics(m.cache), "tcpproxy_transport_insecure"))
	evil := m.evil.Addr.String()
	m.checkAttacks(map[string]string{
		"stranger at the cache":               `instance "evil" (role "client") is not a member`,
		"impostor of the client at the cache": "connection from " + evil + ", not from the member's address " + m.cli.Addr.String(),
		"impostor of the cache at the client": "connection from " + evil + ", not from the member's address " + m.cache.Addr.String(),
		"stranger at the client":              "is not a member",
	})
	log := string(m.procs[0].ReadLog())
	assert.Equal(t, 1, strings.Count(log, `msg="insecure: sessions without TLS`), "one warning at start")
}

// TestHostileHostMutualTLS: with mutual TLS, the attacker holds a
// certificate of another CA for the cache's iid, or one of the mesh's CA
// for another iid; neither gets it in.
func TestHostileHostMutualTLS(t *testing.T) {
	m := newSecMesh(t)
	certs, otherCA := m.withTLS()
	m.start()
	assert.Equal(t, 0.0, metric(m.metrics(m.cache), "tcpproxy_transport_insecure"))
	// The impostors present the other CA's certificate for the member
	// they claim to be; the stranger presents the mesh CA's certificate
	// for "evil", which is not a member.
	m.evilTLS = func(c net.Conn, claim string) net.Conn {
		dir := otherCA
		if claim == "evil" {
			dir = certs
		}
		return evilTLS(t, c, dir, claim)
	}
	m.checkAttacks(map[string]string{
		"stranger at the cache":               `instance "evil" (role "client") is not a member`,
		"impostor of the client at the cache": "certificate",
		"impostor of the cache at the client": "certificate",
		"stranger at the client":              "is not a member",
	})

	// The mesh CA's certificate for evil, claiming to be the client.
	m.evilTLS = func(c net.Conn, _ string) net.Conn { return evilTLS(t, c, certs, "evil") }
	a := m.handshake(m.cache, wire.Hello{IID: "cli-1", Role: "client"}, "cache")
	assert.False(t, a.accepted)
	assert.Contains(t, a.reason, `certificate is for instance "evil" (role "client"), not instance "cli-1"`)
	assert.Empty(t, a.answers)
	out, err := m.redis("PING")
	require.NoError(t, err)
	require.Equal(t, "PONG", out)
}

// withTLS makes certificates for the members and for "evil" from the
// mesh's CA (in certs), and for the members from another CA (in otherCA),
// and configures the proxies with theirs.
func (m *secMesh) withTLS() (certs, otherCA string) {
	certs = filepath.Join(m.dir, "certs")
	otherCA = filepath.Join(m.dir, "other-ca")
	for _, c := range []struct {
		dir string
		ids []string
	}{
		{certs, []string{"cache-1:cache", "cli-1:client", "evil:client"}},
		{otherCA, []string{"cache-1:cache", "cli-1:client"}},
	} {
		out, err := exec.Command(m.bin, append([]string{"certs", "-dir", c.dir}, c.ids...)...).CombinedOutput()
		require.NoError(m.t, err, "%s", out)
	}
	for _, iid := range []string{"cache-1", "cli-1"} {
		m.tls[iid] = fmt.Sprintf("tls: {cert: %s/%s.pem, key: %s/%s-key.pem, ca: %s/ca.pem}\n", certs, iid, certs, iid, certs)
	}
	return certs, otherCA
}

// evilTLS runs TLS on c with the certificate of iid in dir, not checking
// who answers, as an attacker would.
func evilTLS(t *testing.T, c net.Conn, dir, iid string) net.Conn {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, iid+".pem"), filepath.Join(dir, iid+"-key.pem"))
	require.NoError(t, err)
	return tls.Client(c, &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
}
