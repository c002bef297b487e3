//go:build linux

package netns

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/e2e/internal/ns"
)

// floodFDLimit is the cache proxy's file descriptor limit in the flood
// test: a common default for services, and low enough that a flood of
// unbounded handshakes would exhaust it.
const floodFDLimit = 1024

// TestHandshakeFlood: a host that is not a member floods the cache's
// transport port (mutual TLS) with connections that never complete a
// handshake: idle ones, and slow ones that send a TLS ClientHello one
// byte a second. The cache proxy, limited to 1024 file descriptors,
// holds few of them at a time; the client's redis commands keep working
// through its session, with new connections to redis each, and the
// client proxy, restarted during the flood, connects again.
func TestHandshakeFlood(t *testing.T) {
	m := newSecMesh(t)
	m.withTLS()
	m.handshakeTimeout = "5s"
	m.start()
	cache := m.procs[0]
	out, err := exec.Command("prlimit", "--pid", strconv.Itoa(cache.Pid()), fmt.Sprintf("--nofile=%d:%d", floodFDLimit, floodFDLimit)).CombinedOutput()
	require.NoError(t, err, "prlimit: %s", out)

	idleRTT := m.pings(20)
	base := m.usage(m.cache, cache.Pid())
	t.Logf("before the flood: %v; PING over a new connection: %v", base, idleRTT)

	cpu0 := cpuTime(cache.Pid())
	f := startFlood(t, m.evil, fmt.Sprintf("%s:%d", m.cache.Addr, transportPort), 2000)
	// Longer than the handshake timeout: slow connections that got in
	// are timed out, and others take their place.
	long := time.After(7 * time.Second)
	// Until the flood has been refused for a while.
	require.Eventually(t, func() bool {
		return metric(m.metrics(m.cache), "tcpproxy_handshake_refused_total", `side="accept"`, `reason="overload"`) >= 2000
	}, 60*time.Second, 100*time.Millisecond, "the flood reaches the proxy")

	peak := base
	sample := func() {
		u := m.usage(m.cache, cache.Pid())
		peak.fds, peak.goroutines = max(peak.fds, u.fds), max(peak.goroutines, u.goroutines)
	}
	rtt := m.pings(50)
	sample()
	t.Logf("during the flood: PING over a new connection: %v", rtt)

	// The client, restarted, connects again during the flood.
	cli := m.procs[1]
	require.True(t, cli.Stop(10*time.Second))
	restart := time.Now()
	require.NoError(t, cli.Start(m.cmds[1]()))
	require.Eventually(t, func() bool {
		out, err := m.redis("PING")
		return err == nil && out == "PONG"
	}, 30*time.Second, 20*time.Millisecond, "the restarted client reaches redis during the flood")
	t.Logf("restarted client: first PONG %v after its start", time.Since(restart).Round(time.Millisecond))
	sample()
	rtt = m.pings(50)
	sample()
	t.Logf("during the flood, after the restart: PING over a new connection: %v", rtt)

	<-long
	sample()
	cpu := cpuTime(cache.Pid()) - cpu0
	st := f.stop()
	t.Logf("flood: %v; cache proxy CPU during it: %v", st, cpu)
	t.Logf("cache proxy: %v before, peak %v during the flood", base, peak)
	assert.LessOrEqual(t, peak.fds-base.fds, 2*32, "file descriptors held by the flood")
	assert.LessOrEqual(t, peak.goroutines-base.goroutines, 4*32, "goroutines held by the flood")

	// Every connection that reached the proxy was refused, and counted.
	refused := func() float64 {
		text := m.metrics(m.cache)
		var sum float64
		for _, r := range []string{"overload", "timeout", "tls", "protocol"} {
			sum += max(metric(text, "tcpproxy_handshake_refused_total", `side="accept"`, `reason="`+r+`"`), 0)
		}
		return sum
	}
	require.Eventually(t, func() bool { return refused() == float64(st.reached()) }, 10*time.Second, 50*time.Millisecond,
		"refusals counted: %v, want %d", refused(), st.reached())
	// Nothing is left behind.
	require.Eventually(t, func() bool {
		u := m.usage(m.cache, cache.Pid())
		return u.fds <= base.fds && u.goroutines <= base.goroutines
	}, 10*time.Second, 50*time.Millisecond, "after the flood: %v, %v before", m.usage(m.cache, cache.Pid()), base)
	log := string(cache.ReadLog())
	assert.NotContains(t, log, "too many open files")
	assert.Equal(t, 1, countMatches(log, `msg="session refused".*remote=`+m.evil.Addr.String()+`:`), "one line for the first refusal")
}

// usage is a proxy's file descriptors and goroutines.
type usage struct{ fds, goroutines int }

func (u usage) String() string { return fmt.Sprintf("%d fds, %d goroutines", u.fds, u.goroutines) }

// usage reads the file descriptors of process pid and the goroutines
// its admin endpoint on h reports (-1 when it cannot be read).
func (m *secMesh) usage(h *ns.Host, pid int) usage {
	u := usage{fds: -1, goroutines: -1}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		u.fds = len(ents)
	}
	client := m.adminClient(h)
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/vars", secAdminPort))
	if err != nil {
		return u
	}
	defer resp.Body.Close()
	var v struct{ Goroutines int }
	if json.NewDecoder(resp.Body).Decode(&v) == nil {
		u.goroutines = v.Goroutines
	}
	return u
}

// cpuTime is the CPU time process pid has used, or 0 if unknown.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// After the command name in parentheses: state is field 3, utime
	// and stime fields 14 and 15, in clock ticks (100 a second).
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// latencies are the round trips of requests, sorted.
type latencies []time.Duration

func (l latencies) String() string {
	if len(l) == 0 {
		return "none"
	}
	q := func(p float64) time.Duration { return l[int(p*float64(len(l)-1))].Round(10 * time.Microsecond) }
	return fmt.Sprintf("p50 %v, p99 %v, max %v (%d)", q(0.5), q(0.99), l[len(l)-1].Round(10*time.Microsecond), len(l))
}

// pings sends k redis PINGs through the client's request channel, each
// over a new connection (so a new stream, and a new connection from the
// cache proxy to redis), and returns their round trips, connection
// included. Every PING must be answered.
func (m *secMesh) pings(k int) latencies {
	t := m.t
	var out latencies
	for range k {
		start := time.Now()
		c, err := m.cli.Dial(fmt.Sprintf("%s:%d", requestIP, cachePort), 5*time.Second)
		require.NoError(t, err)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Write([]byte("PING\r\n"))
		require.NoError(t, err)
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		require.NoError(t, err)
		require.Equal(t, "+PONG\r\n", line)
		out = append(out, time.Since(start))
	}
	slices.Sort(out)
	return out
}

// flood keeps conns connections open from a host to a transport port,
// none of which completes a handshake: half idle, half sending a TLS
// ClientHello one byte a second. A connection the proxy closes is opened
// again, until stop.
type flood struct {
	done chan struct{}
	wg   sync.WaitGroup
	// Counters: connections established, dials the proxy reset while
	// they connected (it accepted and refused them at once), other dial
	// errors (the accept queue full), connections closed by the proxy
	// within 100 ms.
	opened, resetDials, failedDials, quick atomic.Int64
}

type floodStats struct{ opened, resetDials, failedDials, quick int64 }

// reached is how many connections reached the proxy: each was accepted
// and then refused.
func (s floodStats) reached() int64 { return s.opened + s.resetDials }

func (s floodStats) String() string {
	return fmt.Sprintf("%d connections opened (%d closed by the proxy within 100 ms), %d reset while connecting, %d dials failed",
		s.opened, s.quick, s.resetDials, s.failedDials)
}

func startFlood(t *testing.T, from *ns.Host, addr string, conns int) *flood {
	hello := clientHello(t)
	f := &flood{done: make(chan struct{})}
	// Dials run on threads that joined the host's namespace: a few at a
	// time.
	dials := make(chan struct{}, 16)
	for i := range conns {
		f.wg.Go(func() {
			for !f.stopped() {
				dials <- struct{}{}
				c, err := from.Dial(addr, 5*time.Second)
				<-dials
				switch {
				case errors.Is(err, syscall.ECONNRESET):
					f.resetDials.Add(1)
					continue
				case err != nil:
					f.failedDials.Add(1)
					f.pause(50 * time.Millisecond)
					continue
				}
				f.opened.Add(1)
				start := time.Now()
				if i%2 == 0 {
					f.idle(c)
				} else {
					f.slow(c, hello)
				}
				if time.Since(start) < 100*time.Millisecond {
					f.quick.Add(1)
				}
				c.Close()
			}
		})
	}
	return f
}

func (f *flood) stopped() bool {
	select {
	case <-f.done:
		return true
	default:
		return false
	}
}

// pause waits d, or less if the flood stops.
func (f *flood) pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-f.done:
	}
}

// idle waits until the proxy closes c or the flood stops.
func (f *flood) idle(c net.Conn) {
	for !f.stopped() {
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
	}
}

// slow sends hello one byte a second until the proxy closes c or the
// flood stops.
func (f *flood) slow(c net.Conn, hello []byte) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; ; i++ {
		if _, err := c.Write(hello[i%len(hello) : i%len(hello)+1]); err != nil {
			return
		}
		// A closed connection shows at the next read.
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		select {
		case <-tick.C:
		case <-f.done:
			return
		}
	}
}

// stop ends the flood, closes its connections and returns its counts.
func (f *flood) stop() floodStats {
	close(f.done)
	f.wg.Wait()
	return floodStats{f.opened.Load(), f.resetDials.Load(), f.failedDials.Load(), f.quick.Load()}
}

// clientHello returns the first bytes a TLS client sends.
func clientHello(t *testing.T) []byte {
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = tls.Client(a, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}).Handshake()
	}()
	buf := make([]byte, 64<<10)
	n, err := io.ReadAtLeast(b, buf, 5)
	require.NoError(t, err)
	a.Close()
	b.Close()
	<-done
	return buf[:n]
}

// countMatches counts the matches of the regular expression re in s.
func countMatches(s, re string) int {
	return len(regexp.MustCompile(re).FindAllString(s, -1))
}
