package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// child is a process the bench started. Each runs in its own process group
// (socat forks one process per connection) and gets SIGKILL if the bench's
// thread that started it dies.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

// children are every process the bench started, and what else must be
// undone on the way out (network namespaces, temporary files); killAll
// ends and undoes them.
type children struct {
	mu       sync.Mutex
	list     []*child
	cleanups []func()
}

// atExit registers f to run in killAll, after the processes are killed.
func (cs *children) atExit(f func()) {
	cs.mu.Lock()
	cs.cleanups = append(cs.cleanups, f)
	cs.mu.Unlock()
}

func (cs *children) start(name, logDir string, argv ...string) (*child, error) {
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawn(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	cs.mu.Lock()
	cs.list = append(cs.list, c)
	cs.mu.Unlock()
	return c, nil
}

// spawnReqs feeds the spawner: one goroutine locked to its OS thread for
// the bench's life, which starts every child. Pdeathsig fires when the
// *thread* that forked a child ends, and the Go runtime ends threads (the
// namespace dialer's, for one), so children are forked from a thread that
// never ends.
var spawnReqs = make(chan spawnReq)

type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

func init() {
	go func() {
		runtime.LockOSThread()
		for r := range spawnReqs {
			r.err <- r.cmd.Start()
		}
	}()
}

func spawn(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	spawnReqs <- spawnReq{cmd, errc}
	return <-errc
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// tail returns the end of the child's log, for error messages.
func (c *child) tail() string {
	b, _ := os.ReadFile(c.logPath)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// kill ends the child's whole process group and waits for the child.
func (c *child) kill() {
	_ = syscall.Kill(-c.pid(), syscall.SIGKILL)
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
}

// killAll kills every child; it is safe to call more than once and from a
// signal handler goroutine.
func (cs *children) killAll() {
	cs.mu.Lock()
	list, cleanups := cs.list, cs.cleanups
	cs.list, cs.cleanups = nil, nil
	cs.mu.Unlock()
	for _, c := range list {
		c.kill()
	}
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
}

// rssKiB is a process's resident set size (VmRSS) in KiB.
func rssKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fields := strings.Fields(rest)
			if len(fields) == 0 {
				break
			}
			return strconv.ParseInt(fields[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// adminVars is what a tcpproxy admin endpoint reports at /debug/vars.
type adminVars struct {
	Goroutines int    `json:"goroutines"`
	HeapInuse  int64  `json:"heapInuse"`
	StackInuse int64  `json:"stackInuse"`
	Sys        int64  `json:"sys"`
	NumGC      uint32 `json:"numGC"`
}

// adminQuery reads a tcpproxy admin endpoint's /debug/vars; without
// memstats only the goroutine count is filled in (and the process is not
// stopped for ReadMemStats).
func adminQuery(ctx context.Context, hc *http.Client, addr string, memstats bool) (adminVars, error) {
	var v adminVars
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	url := "http://" + addr + "/debug/vars"
	if !memstats {
		url += "?memstats=0"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return v, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return v, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return v, fmt.Errorf("admin %s: %w", addr, err)
	}
	return v, nil
}

// freePorts returns n distinct TCP ports free on 127.0.0.1 right now:
// each listener stays open until all are picked, or the kernel may hand
// out a port twice.
func freePorts(n int) ([]int, error) {
	out := make([]int, n)
	for i := range out {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		out[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return out, nil
}

// ensureTools installs socat, haproxy and stunnel4 (Debian's package and
// command names) with apt-get when they are missing and the bench runs as
// root. It returns what is still missing.
func ensureTools(install bool, logf func(string, ...any)) map[string]bool {
	missing := map[string]bool{}
	for _, t := range []string{"socat", "haproxy", "stunnel4"} {
		if _, err := exec.LookPath(t); err != nil {
			missing[t] = true
		}
	}
	if len(missing) == 0 || !install {
		return missing
	}
	if os.Geteuid() != 0 {
		logf("not root: cannot install %v; those paths are skipped", keys(missing))
		return missing
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		logf("no apt-get: cannot install %v; those paths are skipped", keys(missing))
		return missing
	}
	run := func(args ...string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			s := out.String()
			if len(s) > 1500 {
				s = s[len(s)-1500:]
			}
			return fmt.Errorf("%s: %w\n%s", strings.Join(args, " "), err, s)
		}
		return nil
	}
	logf("installing %v with apt-get", keys(missing))
	if err := run("apt-get", "update", "-qq"); err != nil {
		logf("apt-get update failed: %v", err)
	}
	if err := run(append([]string{"apt-get", "install", "-y", "-qq", "--no-install-recommends"}, keys(missing)...)...); err != nil {
		logf("apt-get install failed: %v", err)
	}
	for t := range missing {
		if _, err := exec.LookPath(t); err == nil {
			delete(missing, t)
		}
	}
	return missing
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// waitFor polls f until it succeeds or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// clockTick is the unit of /proc/PID/stat's times (USER_HZ, 100 on Linux).
const clockTick = 10 * time.Millisecond

// cpuTime is the CPU time (user and system) a process and its reaped
// children have used.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; the fields after it are
	// state, ppid, ... with utime, stime, cutime, cstime at 14 to 17.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks int64
	for _, s := range f[11:15] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += v
	}
	return time.Duration(ticks) * clockTick, nil
}

// machineCPU is the non-idle CPU time of every CPU of the machine since
// boot (/proc/stat: user, nice, system, irq, softirq, steal).
func machineCPU() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var ticks int64
	for i, s := range f[1:9] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		ticks += v
	}
	return time.Duration(ticks) * clockTick, nil
}

// startProfiles takes a 4-second CPU profile of each of p's tcpproxy
// processes through their admin endpoints, from now on, and returns a
// function that waits for them to be saved in dir as
// <path>-<measurement>-<process>.pprof. Profile measurements that last
// about that long (or longer: only the first 4 seconds are profiled).
func startProfiles(ctx context.Context, dir string, p *path, name string) (wait func()) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return func() {}
	}
	var wg sync.WaitGroup
	for i, a := range p.admins {
		file := filepath.Join(dir, fmt.Sprintf("%s-%s-%s.pprof", p.key, name, p.procs[i].name))
		wg.Go(func() {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a+"/debug/pprof/profile?seconds=4", nil)
			if err != nil {
				return
			}
			resp, err := p.httpClient().Do(req)
			if err != nil {
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(file)
			if err != nil {
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		})
	}
	return wg.Wait
}
