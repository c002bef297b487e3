package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestMetricsValidation(t *testing.T) {
	for _, ok := range []string{"", "0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100", "127.0.0.5:9100", "[fd00::1]:9100", "127.0.0.1:9091"} {
		assert.NoError(t, validateMetrics(ok, "127.0.0.1:9090", "0.0.0.0:7000"), ok)
	}
	for _, tc := range []struct{ addr, admin, listen, want string }{
		{"9100", "", "", "not an ip:port address"},
		{":9100", "", "", "not an ip:port address"},
		{"localhost:9100", "", "", "not an ip:port address"},
		{"0.0.0.0:99999", "", "", "not an ip:port address"},
		{"0.0.0.0:0", "", "", "has port 0"},
		{"0.0.0.0:9090", "127.0.0.1:9090", "", "takes the port of admin 127.0.0.1:9090"},
		{"127.0.0.1:9090", "127.0.0.1:9090", "", "takes the port of admin"},
		{"10.0.0.1:7000", "", "0.0.0.0:7000", "takes the port of listen 0.0.0.0:7000"},
		{"10.0.0.1:7000", "", ":7000", "takes the port of listen"},
		{"[::]:7000", "", "10.0.0.1:7000", "takes the port of listen"},
	} {
		err := validateMetrics(tc.addr, tc.admin, tc.listen)
		if assert.Error(t, err, tc.addr) {
			assert.Contains(t, err.Error(), tc.want)
			assert.True(t, strings.HasPrefix(err.Error(), "metrics: "), err.Error())
		}
	}
	// In a configuration file, with the field named.
	_, err := parseConfig([]byte("iid: a\nrole: r\nlisten: 127.0.0.1:7000\nmetrics: 0.0.0.0\nchannels:\n  db: {kind: reply, port: 1}\n"))
	require.ErrorContains(t, err, `metrics: "0.0.0.0" is not an ip:port address`)
	cfg, err := parseConfig([]byte("iid: a\nrole: r\nlisten: 127.0.0.1:7000\nmetrics: 0.0.0.0:9100\nchannels:\n  db: {kind: reply, port: 1}\n"))
	require.NoError(t, err)
	assert.Equal(t, "0.0.0.0:9100", cfg.Metrics)
}

// get asks url and returns the status and body.
func get(t *testing.T, c *http.Client, method, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(body)
}

// checkOnlyMetrics checks that base (http://host:port) answers /metrics
// with the instance's metrics, and nothing else.
func checkOnlyMetrics(t *testing.T, c *http.Client, base, iid string) {
	t.Helper()
	code, body := get(t, c, http.MethodGet, base+"/metrics")
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, fmt.Sprintf(`tcpproxy_transport_insecure{iid=%q} 0`, iid))
	assert.Contains(t, body, "go_goroutines ")
	code, _ = get(t, c, http.MethodHead, base+"/metrics")
	assert.Equal(t, http.StatusOK, code)
	for _, path := range []string{
		"/", "/api/status", "/api/status?history=1", "/healthz", "/readyz", "/static/", "/static/app.js",
		"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/pprof/cmdline", "/debug/vars",
		"/metrics/", "/metricsz", "/METRICS", "/metrics/../debug/vars",
	} {
		code, body := get(t, c, http.MethodGet, base+path)
		assert.Equal(t, http.StatusNotFound, code, "%s: %.200s", path, body)
		assert.False(t, strings.Contains(body, "goroutine") || strings.Contains(body, "tcpproxy"), "%s: %.200s", path, body)
	}
	code, _ = get(t, c, http.MethodPost, base+"/metrics")
	assert.Equal(t, http.StatusMethodNotAllowed, code)
}

// TestMetricsListenerOnlyMetrics: the metrics listener, here on a
// loopback address other than 127.0.0.1, serves /metrics and 404 for
// everything the admin endpoint has besides.
func TestMetricsListenerOnlyMetrics(t *testing.T) {
	addr, stop, err := startMetrics("127.0.0.3:0", slog.New(slog.DiscardHandler), newObserver("m-1"))
	require.NoError(t, err)
	defer stop()
	checkOnlyMetrics(t, http.DefaultClient, "http://"+addr.String(), "m-1")

	_, _, err = startMetrics(addr.String(), slog.New(slog.DiscardHandler), newObserver("m-2"))
	require.ErrorContains(t, err, "metrics listen "+addr.String())
}

// setMetricsLimits changes the metrics listener's limits for one test.
func setMetricsLimits(t *testing.T, f func()) {
	old := metricsLimits
	f()
	t.Cleanup(func() { metricsLimits = old })
}

// TestMetricsListenerBounded: connections beyond the limit wait (a scrape
// does not get through while the slots are taken) and get through once
// the slots free.
func TestMetricsListenerBounded(t *testing.T) {
	setMetricsLimits(t, func() { metricsLimits.conns = 2 })
	addr, stop, err := startMetrics("127.0.0.1:0", slog.New(slog.DiscardHandler), newObserver("m-1"))
	require.NoError(t, err)
	defer stop()
	var idle []net.Conn
	for range metricsLimits.conns {
		c, err := net.Dial("tcp", addr.String())
		require.NoError(t, err)
		idle = append(idle, c)
	}
	url := "http://" + addr.String() + "/metrics"
	client := &http.Client{Timeout: 300 * time.Millisecond}
	_, err = client.Get(url)
	var ne net.Error
	require.ErrorAs(t, err, &ne, "a scrape beyond the limit must wait")
	assert.True(t, ne.Timeout(), "%v", err)
	for _, c := range idle {
		require.NoError(t, c.Close())
	}
	code, _ := get(t, &http.Client{Timeout: 10 * time.Second}, http.MethodGet, url)
	assert.Equal(t, http.StatusOK, code)
}

// TestMetricsListenerHeaderTimeout: a connection that does not finish its
// request headers in time is closed (slowloris).
func TestMetricsListenerHeaderTimeout(t *testing.T) {
	setMetricsLimits(t, func() { metricsLimits.readHeader = 100 * time.Millisecond })
	addr, stop, err := startMetrics("127.0.0.1:0", slog.New(slog.DiscardHandler), newObserver("m-1"))
	require.NoError(t, err)
	defer stop()
	c, err := net.Dial("tcp", addr.String())
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n")
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = io.ReadAll(c)
	require.NoError(t, err, "the server closes the connection (EOF) before the client gives up")
}

// TestMetricsListenerOtherHost: `tcpproxy run` in one network namespace
// with metrics on its non-loopback address is scraped from another
// namespace, as Prometheus scrapes a pod; that host gets /metrics only, and
// cannot reach the admin endpoint at all.
func TestMetricsListenerOtherHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("ip (iproute2) not installed: %v", err)
	}
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	prefix := "tp-" + hex.EncodeToString(rnd[:])
	pod, prom := prefix+"-pod", prefix+"-prom"
	ipCmd := func(args ...string) {
		t.Helper()
		out, err := exec.Command("ip", args...).CombinedOutput()
		require.NoError(t, err, "ip %s: %s", strings.Join(args, " "), out)
	}
	for _, ns := range []string{pod, prom} {
		ipCmd("netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		ipCmd("-n", ns, "link", "set", "lo", "up")
	}
	// A veth between the two, made inside pod: the root namespace never
	// sees it.
	ipCmd("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", prom)
	ipCmd("-n", pod, "addr", "add", "10.77.0.1/24", "dev", "eth0")
	ipCmd("-n", prom, "addr", "add", "10.77.0.2/24", "dev", "eth0")
	ipCmd("-n", pod, "link", "set", "eth0", "up")
	ipCmd("-n", prom, "link", "set", "eth0", "up")

	cfg := filepath.Join(t.TempDir(), "m.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte(`iid: m-1
role: r
listen: 127.0.0.1:7000
channels:
  db: {kind: reply, port: 5432}
admin: 127.0.0.1:9090
metrics: 10.77.0.1:9100
drainTimeout: 1s
`), 0o600))
	p := startProcWith(t, "ip", nil, "netns", "exec", pod, tcpproxyBinary(t), "run", "-config", cfg)

	client := &http.Client{Transport: &http.Transport{DialContext: dialInNetns(prom)}, Timeout: 5 * time.Second}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		resp, err := client.Get("http://10.77.0.1:9100/metrics")
		if assert.NoError(c, err) {
			resp.Body.Close()
		}
	}, 20*time.Second, 20*time.Millisecond, "tcpproxy log:\n%s", p.out)
	checkOnlyMetrics(t, client, "http://10.77.0.1:9100", "m-1")
	// The admin endpoint listens on the pod's 127.0.0.1 only.
	_, err := client.Get("http://10.77.0.1:9090/")
	require.ErrorIs(t, err, unix.ECONNREFUSED)
	p.stop(t)
}

// dialInNetns returns a DialContext that opens its sockets in the named
// network namespace, from an OS thread that joins it and is then
// discarded.
func dialInNetns(name string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		done := make(chan result, 1)
		go func() {
			// Never unlocked: the thread ends with the goroutine rather
			// than serve others in the wrong namespace.
			runtime.LockOSThread()
			fd, err := unix.Open("/var/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				done <- result{err: fmt.Errorf("open namespace %s: %w", name, err)}
				return
			}
			defer unix.Close(fd)
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				done <- result{err: fmt.Errorf("enter namespace %s: %w", name, err)}
				return
			}
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			done <- result{c, err}
		}()
		r := <-done
		if r.err != nil && errors.Is(r.err, context.Canceled) {
			return nil, ctx.Err()
		}
		return r.c, r.err
	}
}
