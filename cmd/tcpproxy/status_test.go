package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// statusMesh is two `tcpproxy run` processes over mutual TLS, each with
// an admin endpoint: srv-1 serves reply channel "api" (an echo server) and
// duplex channel "ring"; cli-1 has request channel "api" and "ring" too.
// The membership also lists gone-1, which serves "api" at an address
// nobody listens on.
type statusMesh struct {
	srvAdmin, cliAdmin string
	// api is where cli-1's legacy clients reach the request channel.
	api      string
	srv, cli *proc
}

func startStatusMesh(t *testing.T) *statusMesh {
	t.Helper()
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	require0(t, realMain([]string{"certs", "-dir", dir, "srv-1:server", "cli-1:client"}, &out, &errOut), out.String()+errOut.String())

	srvRanges := proxy.Addressing{InstanceRange: netip.MustParsePrefix("127.74.0.0/16"), RequestRange: netip.MustParsePrefix("127.75.0.0/16")}
	cliRanges := `{instanceRange: 127.76.0.0/16, requestRange: 127.77.0.0/16}`
	apiPort, ringPort := freePort(t), freePort(t)
	srvIP, err := proxy.BindIP(srvRanges, "srv-1")
	require.NoError(t, err)
	serveEcho(t, net.JoinHostPort(srvIP.String(), strconv.Itoa(apiPort)))

	m := &statusMesh{
		srvAdmin: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		cliAdmin: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		api:      fmt.Sprintf("127.77.0.1:%d", apiPort),
	}
	srvListen, cliListen := freePort(t), freePort(t)
	membersPath := filepath.Join(dir, "members.yaml")
	require.NoError(t, os.WriteFile(membersPath, fmt.Appendf(nil, `members:
  - {iid: srv-1, role: server, addr: "127.0.0.1:%d", channels: {api: %d, ring: %d}}
  - {iid: cli-1, role: client, addr: "127.0.0.1:%d", channels: {ring: %d}}
  - {iid: gone-1, role: server, addr: "127.0.0.1:%d", channels: {api: %d}}
`, srvListen, apiPort, ringPort, cliListen, ringPort, freePort(t), apiPort), 0o600))
	write := func(iid, role string, listen int, ranges, admin, chans string) string {
		p := filepath.Join(dir, iid+".yaml")
		require.NoError(t, os.WriteFile(p, fmt.Appendf(nil, `iid: %s
role: %s
listen: 127.0.0.1:%d
addressing: %s
members: {file: %s, poll: 100ms}
tls: {cert: %s/%s.pem, key: %s/%s-key.pem, ca: %s/ca.pem}
transport: {keepAlive: 200ms}
channels:
%s
admin: %s
drainTimeout: 2s
`, iid, role, listen, ranges, membersPath, dir, iid, dir, iid, dir, chans, admin), 0o600))
		return p
	}
	srvCfg := write("srv-1", "server", srvListen, "{instanceRange: 127.74.0.0/16, requestRange: 127.75.0.0/16}", m.srvAdmin,
		fmt.Sprintf("  api: {kind: reply, port: %d}\n  ring: {kind: duplex, port: %d}", apiPort, ringPort))
	cliCfg := write("cli-1", "client", cliListen, cliRanges, m.cliAdmin,
		fmt.Sprintf("  api: {kind: request, port: %d}\n  ring: {kind: duplex, port: %d}", apiPort, ringPort))
	m.srv = startProc(t, nil, "run", "-config", srvCfg)
	m.cli = startProc(t, nil, "run", "-config", cliCfg)
	// Both ready: their admin endpoints say so.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for _, a := range []string{m.srvAdmin, m.cliAdmin} {
			resp, err := http.Get("http://" + a + "/readyz")
			if assert.NoError(c, err) {
				resp.Body.Close()
				assert.Equal(c, http.StatusOK, resp.StatusCode)
			}
		}
	}, 20*time.Second, 20*time.Millisecond, "server log:\n%s\nclient log:\n%s", m.srv.out, m.cli.out)
	return m
}

// serveEcho runs a legacy echo server on addr until the test ends.
func serveEcho(t *testing.T, addr string) {
	ln, err := net.Listen("tcp4", addr)
	require.NoError(t, err)
	var echoes sync.WaitGroup
	echoes.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			echoes.Go(func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		echoes.Wait()
	})
}

// echo sends n bytes through the request channel and checks that
// the same bytes come back.
func (m *statusMesh) echo(t *testing.T, n int) {
	t.Helper()
	c, err := net.DialTimeout("tcp4", m.api, 5*time.Second)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	sent := make([]byte, n)
	for i := range sent {
		sent[i] = byte(i*7 + i>>8)
	}
	go func() {
		_, _ = c.Write(sent)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.True(t, bytes.Equal(sent, got), "echo through the mesh: sent %d bytes, got %d back", len(sent), len(got))
}

// status runs `tcpproxy status` with args and returns its output.
func status(t *testing.T, args ...string) (string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := realMain(append([]string{"status"}, args...), &out, &errOut)
	return out.String() + errOut.String(), code
}

// TestStatusCommand: `tcpproxy status` against a running two-instance
// mesh shows the instance, its channels with their counters and members,
// the unreachable member with why, and the sessions with their TLS
// identity, RTT and bytes; -json has the same for scripts; -check and
// -live are exit statuses for probes.
func TestStatusCommand(t *testing.T) {
	m := startStatusMesh(t)
	const n = 300_000
	m.echo(t, n)

	var r statusReport
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		out, code := status(t, "-admin", m.cliAdmin, "-json")
		if !assert.Equal(c, 0, code, out) || !assert.NoError(c, json.Unmarshal([]byte(out), &r)) {
			return
		}
		// The proxy counts bytes as its writes return, and RTT comes with
		// the first pong: wait for both.
		if assert.Len(c, r.Channels, 2) {
			assert.Equal(c, int64(n), r.Channels[0].BytesOut)
			assert.Equal(c, int64(n), r.Channels[0].BytesIn)
		}
		if assert.NotEmpty(c, r.Sessions) {
			assert.Positive(c, r.Sessions[0].RTTSeconds)
		}
	}, 20*time.Second, 20*time.Millisecond)

	in := r.Instance
	assert.Equal(t, "cli-1", in.IID)
	assert.Equal(t, "client", in.Role)
	assert.Equal(t, "loopback", in.Network)
	assert.Equal(t, "mtls", in.Transport)
	assert.True(t, in.Ready)
	assert.Positive(t, in.UptimeSeconds)
	assert.Equal(t, buildVersion(), in.Version)

	api, ring := r.Channels[0], r.Channels[1]
	assert.Equal(t, "api", api.Name)
	assert.Equal(t, "request", api.Kind)
	assert.Equal(t, []string{m.api}, api.Listen)
	assert.Equal(t, int64(1), api.Connections)
	assert.Zero(t, api.Active)
	if assert.Len(t, api.Members, 2) {
		assert.Equal(t, "gone-1", api.Members[0].IID)
		assert.Equal(t, "srv-1", api.Members[1].IID)
		assert.Equal(t, "up", api.Members[1].State)
		assert.Regexp(t, `^127\.76\.`, api.Members[1].IP)
	}
	assert.Equal(t, "ring", ring.Name)
	assert.Equal(t, "both", ring.Mode)
	if assert.Len(t, ring.Members, 2) {
		assert.Equal(t, channelMember{IID: "cli-1", IP: in.BindIP, Port: ring.Members[0].Port, Addr: ring.Members[0].Addr, State: "self"}, ring.Members[0])
		assert.Equal(t, "srv-1", ring.Members[1].IID)
		assert.Equal(t, []string{net.JoinHostPort(ring.Members[1].IP, strconv.Itoa(ring.Members[1].Port))}, ring.Listen, "the impostor for srv-1")
	}

	var sent, received uint64
	for _, s := range r.Sessions {
		assert.Equal(t, "srv-1", s.Peer)
		assert.Equal(t, "unix", s.Net, "same-host peers take the Unix socket")
		assert.True(t, s.Dialed)
		assert.Equal(t, "tcpproxy://instance/srv-1?role=server", s.Identity)
		sent += s.BytesSent
		received += s.BytesReceived
	}
	// Stream data both ways: the payload, and the stream header going out.
	assert.Greater(t, sent, uint64(n))
	assert.Less(t, sent, uint64(n+1024))
	assert.Equal(t, uint64(n), received)

	var gone memberReport
	for _, mr := range r.Members {
		if mr.IID == "gone-1" {
			gone = mr
		}
	}
	assert.Equal(t, "backoff", gone.State)
	assert.Contains(t, gone.LastError, "connection refused")

	// The text: every line within 80 columns, one per channel, member
	// and session.
	out, code := status(t, "-admin", m.cliAdmin)
	require.Equal(t, 0, code, out)
	for line := range strings.Lines(out) {
		assert.LessOrEqual(t, utf8.RuneCountInString(strings.TrimSuffix(line, "\n")), 80, "line %q", line)
	}
	for _, re := range []string{
		`(?m)^cli-1 \(client\) ready, bind 127\.76\.[0-9.]+, loopback, mtls, up \d+s$`,
		`(?m)^api +request +` + m.api + ` +0 +1 +0 +0 +293K +293K$`,
		`(?m)^ring +duplex +→127\.76\.[0-9.:]+ +0 +0 +0 +0 +0B +0B$`,
		`(?m)^api +gone-1 +127\.76\.[0-9.:]+ +127\.0\.0\.1:\d+ +backoff$`,
		`(?m)^api +srv-1 +127\.76\.[0-9.:]+ +127\.0\.0\.1:\d+ +up$`,
		`(?m)^ring +cli-1 +.* +self$`,
		`(?m)^  gone-1: \d+ failed dials?, the last:\n    dial gone-1 .*\n    .*connection refused$`,
		`(?m)^srv-1 +unix +\d+s +[0-9.]+[µm]s .* instance/srv-1\?role=server$`,
	} {
		assert.Regexp(t, re, out)
	}

	// The server's side: the session accepted from cli-1.
	out, code = status(t, "-admin", m.srvAdmin)
	require.Equal(t, 0, code, out)
	assert.Regexp(t, `(?m)^srv-1 \(server\) ready`, out)
	assert.Regexp(t, `(?m)^api +reply +→127\.74\.[0-9.:]+ +0 +1 +0 +0 +293K +293K$`, out)
	assert.Regexp(t, `(?m)^cli-1 +unix .* instance/cli-1\?role=client$`, out)

	// Probes.
	out, code = status(t, "-admin", m.cliAdmin, "-check")
	assert.Equal(t, 0, code, out)
	assert.Equal(t, "ready\n", out)
	out, code = status(t, "-admin", m.cliAdmin, "-live")
	assert.Equal(t, 0, code, out)

	m.cli.stop(t)
	out, code = status(t, "-admin", m.cliAdmin, "-check")
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "no tcpproxy instance answers at "+m.cliAdmin)
	assert.Contains(t, out, "admin: "+m.cliAdmin)
	m.srv.stop(t)
}

func TestStatusCommandErrors(t *testing.T) {
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	out, code := status(t, "-admin", addr)
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "no tcpproxy instance answers at "+addr)
	assert.Contains(t, out, "`admin: "+addr+"` in its configuration")

	out, code = status(t, "-admin", "0.0.0.0:9090")
	assert.Equal(t, 2, code)
	assert.Contains(t, out, "is not 127.0.0.1:port")

	// An instance that is up but not ready: -check fails and says so.
	srv := httptest.NewServer(adminMux(newObserver("t")))
	defer srv.Close()
	a := strings.TrimPrefix(srv.URL, "http://")
	out, code = status(t, "-admin", a, "-check")
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "/readyz at "+a+": 503 Service Unavailable: not ready")
	out, code = status(t, "-admin", a, "-live")
	assert.Equal(t, 0, code, out)
	// Its status before the instance started: the instance line only.
	out, code = status(t, "-admin", a)
	assert.Equal(t, 0, code, out)
	assert.Contains(t, out, "t (-) NOT READY")
	assert.Contains(t, out, "(no channels)")
	assert.Contains(t, out, "(no sessions)")
}

// TestAdminRefusesOtherHosts: a request naming the endpoint by a host
// name other than localhost (DNS rebinding) is refused.
func TestAdminRefusesOtherHosts(t *testing.T) {
	srv := httptest.NewServer(adminMux(newObserver("t")))
	defer srv.Close()
	for host, want := range map[string]int{
		"":                   http.StatusOK, // the listener's address
		"localhost:9090":     http.StatusOK,
		"[::1]:9090":         http.StatusOK,
		"evil.example:9090":  http.StatusMisdirectedRequest,
		"evil.example":       http.StatusMisdirectedRequest,
		"127.0.0.1.nip.test": http.StatusMisdirectedRequest,
	} {
		for _, path := range []string{"/api/status", "/", "/metrics", "/debug/pprof/"} {
			req, err := http.NewRequest(http.MethodGet, srv.URL+path, nil)
			require.NoError(t, err)
			if host != "" {
				req.Host = host
			}
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, want, resp.StatusCode, "%s %s", host, path)
		}
	}
}

func TestSampler(t *testing.T) {
	s := newSampler(time.Second)
	t0 := time.Unix(1000, 0)
	for i := range historyLen + 5 {
		stats := []proxy.ChannelStats{{Channel: "a", Connections: int64(i), BytesIn: int64(10 * i)}}
		if i >= historyLen { // a channel seen late lines up with the others
			stats = append(stats, proxy.ChannelStats{Channel: "b", Active: 1})
		}
		s.add(t0.Add(time.Duration(i)*time.Second), stats)
	}
	h := s.snapshot()
	require.Len(t, h.Times, historyLen)
	assert.Equal(t, t0.Add(5*time.Second).UnixMilli(), h.Times[0], "the oldest samples are dropped")
	assert.Equal(t, int64(5), h.Channels["a"].Connections[0])
	assert.Equal(t, int64(10*(historyLen+4)), h.Channels["a"].BytesIn[historyLen-1])
	b := h.Channels["b"]
	require.Len(t, b.Active, historyLen)
	assert.Equal(t, int64(0), b.Active[historyLen-6])
	assert.Equal(t, int64(1), b.Active[historyLen-5])
	// The snapshot is a copy.
	h.Channels["a"].Connections[0] = -1
	assert.Equal(t, int64(5), s.snapshot().Channels["a"].Connections[0])

	// run samples at once and then on every tick, until stopped.
	stop := make(chan struct{})
	calls := make(chan struct{}, 1)
	r := newSampler(time.Millisecond)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.run(func() []proxy.ChannelStats {
			select {
			case calls <- struct{}{}:
			default:
			}
			return []proxy.ChannelStats{{Channel: "x"}}
		}, stop)
	}()
	<-calls
	<-calls
	close(stop)
	<-done
	assert.GreaterOrEqual(t, len(r.snapshot().Times), 2)
}

func TestFormat(t *testing.T) {
	for n, want := range map[uint64]string{0: "0B", 999: "999B", 1000: "1.0K", 1536: "1.5K", 300_000: "293K", 5 << 20: "5.0M", 1 << 40: "1.0T"} {
		assert.Equal(t, want, fmtSize(n), "%d", n)
	}
	for sec, want := range map[float64]string{0.4: "0s", 59: "59s", 61: "1m01s", 3600 * 5.5: "5h30m", 86400 * 3: "3d00h"} {
		assert.Equal(t, want, fmtDuration(sec), "%v", sec)
	}
	for sec, want := range map[float64]string{0: "-", 0.000123: "123µs", 0.0123456: "12.35ms", 2.5: "2.5s"} {
		assert.Equal(t, want, fmtRTT(sec), "%v", sec)
	}
	assert.Equal(t, "abcd…", clip("abcdefgh", 5))
	assert.Equal(t, "abc", clip("abc", 5))
	assert.Equal(t, []string{"one two", "three", "four f…"}, wrap("one two three four five six", 7, 3))
	assert.Equal(t, []string{"abcdefg…"}, wrap("abcdefghijkl", 8, 3))
}
