package membership

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tcpproxy/tcpproxy/channels"
)

// etcdServer is a real etcd on free 127.0.0.1 ports with its data in a
// test's temporary directory.
type etcdServer struct {
	t         *testing.T
	bin       string
	dir       string
	clientURL string
	peerURL   string
	cmd       *exec.Cmd
	exited    chan struct{}
}

// startEtcd starts etcd and waits until it is healthy; the test is skipped
// when etcd is not installed.
func startEtcd(t *testing.T) *etcdServer {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd is not installed (Debian: apt-get install etcd-server); skipping the test against a real etcd")
	}
	addrs := freeAddrs(t, 2)
	e := &etcdServer{
		t:         t,
		bin:       bin,
		dir:       t.TempDir(),
		clientURL: "http://" + addrs[0],
		peerURL:   "http://" + addrs[1],
	}
	t.Cleanup(func() {
		e.kill()
		if t.Failed() {
			if out, err := os.ReadFile(filepath.Join(e.dir, "etcd.log")); err == nil {
				if len(out) > 8000 {
					out = out[len(out)-8000:]
				}
				t.Logf("end of etcd's log:\n%s", out)
			}
		}
	})
	e.start()
	return e
}

func freeAddr(t *testing.T) string {
	t.Helper()
	return freeAddrs(t, 1)[0]
}

// freeAddrs returns n distinct free 127.0.0.1 addresses: each listener
// stays open until all are picked, or the kernel may hand out a port
// twice (etcd then fails with "address already in use").
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	addrs := make([]string, n)
	for i := range addrs {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer l.Close()
		addrs[i] = l.Addr().String()
	}
	return addrs
}

// start runs etcd (again, on the same data directory and ports) and waits
// until it answers /health.
func (e *etcdServer) start() {
	t := e.t
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(e.dir, "etcd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	cmd := exec.Command(e.bin,
		"--name", "test",
		"--data-dir", filepath.Join(e.dir, "data"),
		"--listen-client-urls", e.clientURL,
		"--advertise-client-urls", e.clientURL,
		"--listen-peer-urls", e.peerURL,
		"--initial-advertise-peer-urls", e.peerURL,
		"--initial-cluster", "test="+e.peerURL,
		"--initial-cluster-state", "new",
		// A fast election: the node is leader sooner after a start.
		"--heartbeat-interval", "50",
		"--election-timeout", "500",
		"--logger", "zap", "--log-outputs", "stderr",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")} // no ETCD_* from the environment
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(exited)
	}()
	e.cmd, e.exited = cmd, exited

	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	defer hc.CloseIdleConnections()
	healthy := func() bool {
		resp, err := hc.Get(e.clientURL + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(`"health":"true"`))
	}
	deadline := time.Now().Add(20 * time.Second)
	for !healthy() {
		select {
		case <-exited:
			t.Fatalf("etcd exited while starting: %v", cmd.ProcessState)
		case <-time.After(50 * time.Millisecond): // polling interval
		}
		require.True(t, time.Now().Before(deadline), "etcd not healthy after 20s")
	}
}

// kill stops etcd at once, as a crash would.
func (e *etcdServer) kill() {
	if e.cmd == nil {
		return
	}
	_ = e.cmd.Process.Kill()
	<-e.exited
	e.cmd = nil
}

// client returns a plain etcd client for the test to change the registry
// behind the sources' backs.
func (e *etcdServer) client(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: []string{e.clientURL}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// logBuffer collects a source's logs for the test to check.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testLogs returns a log buffer whose contents the test prints if it
// fails: a source's own account of a timing failure is the way to tell a
// slow machine from a bug.
func testLogs(t *testing.T) *logBuffer {
	b := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the sources' log:\n%s", b.String())
		}
	})
	return b
}

func (b *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// watchSource watches src until the test ends, then waits for the channel
// to close (so no goroutine outlives the test).
func watchSource(t *testing.T, src channels.Source) <-chan []channels.Member {
	t.Helper()
	ch, stop := watchUntil(t, src)
	t.Cleanup(stop)
	return ch
}

// watchUntil watches src until stop is called; stop returns once the
// source closed its channel.
func watchUntil(t *testing.T, src channels.Source) (<-chan []channels.Member, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := src.Watch(ctx)
	if err != nil {
		cancel()
		require.NoError(t, err)
	}
	out := make(chan []channels.Member)
	done := make(chan struct{})
	// Relay through an unbuffered channel that the test reads, so that
	// stop can drain the source without racing the test.
	go func() {
		defer close(done)
		defer close(out)
		for list := range ch {
			select {
			case out <- list:
			case <-ctx.Done():
			}
		}
	}()
	var once sync.Once
	return out, func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				t.Error("the source did not close its channel after the context ended")
			}
		})
	}
}

// waitList receives lists until one has exactly the iids want, and
// returns it.
func waitList(t *testing.T, ch <-chan []channels.Member, timeout time.Duration, want ...string) []channels.Member {
	t.Helper()
	if want == nil {
		want = []string{}
	}
	deadline := time.After(timeout)
	var last []string
	for {
		select {
		case list, ok := <-ch:
			require.True(t, ok, "channel closed while waiting for %v (last %v)", want, last)
			last = iids(list)
			if slices.Equal(last, want) {
				return list
			}
		case <-deadline:
			require.FailNow(t, "timed out", "waiting for members %v; last list %v", want, last)
		}
	}
}

func iids(list []channels.Member) []string {
	out := []string{}
	for _, m := range list {
		out = append(out, m.IID)
	}
	return out
}

func member(iid string, port int) channels.Member {
	return channels.Member{
		IID: iid, Role: "cache", Addr: "127.0.0.1:" + strconv.Itoa(port),
		Channels: map[string]uint16{"peers": 2380},
	}
}
