// Command bench measures tcpproxy against direct TCP, a socat relay and
// haproxy in TCP mode, side by side on this machine, and writes a markdown
// table to bench/results.md:
//
//	go run ./scripts/bench            # full run, about 6 minutes on 2 CPUs
//	go run ./scripts/bench -h         # sizes, counts, repetitions, paths
//
// It installs socat and haproxy with apt-get when they are missing and it
// runs as root, builds cmd/tcpproxy, and drives every path with its own Go
// load generator against its own echo and sink servers (a child process).
// Paths: direct TCP, socat, haproxy, one plain Go relay (relay1, the floor
// of any user-space proxy), two in a chain (relay2, the floor of two-proxy
// designs over TCP), one gVisor relay on a TUN device (tunrelay, the floor
// of a proxy on one), two `tcpproxy run` processes
// request→reply (with sessions over the same-host Unix socket, and over
// TCP) and duplex on the loopback network, and the client side on
// the netstack networks: memory (a proxy in the bench process) and tun (in
// a network namespace made for each repetition and deleted after it; root
// only). Only 127.0.0.0/8 is used; every load loop is bounded in count and
// time; every child process is killed and every namespace deleted at the
// end, also on error or Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

type options struct {
	sizeMiB     int
	parallel    int
	requests    int
	clients     int
	requestsPer int
	msgSize     int
	conns       int
	connWorkers int
	idle        int
	reps        int
	timeout     time.Duration
	paths       string
	out         string
	install     bool
	binary      string
	tests       string
	pprofDir    string
}

// runs reports whether test is among -tests.
func (o options) runs(test string) bool {
	for _, t := range strings.Split(o.tests, ",") {
		if strings.TrimSpace(t) == test {
			return true
		}
	}
	return false
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-serve" {
		serveMain(os.Args[2:])
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-relay" {
		relayMain(os.Args[2:])
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-tunrelay" {
		tunRelayMain(os.Args[2:])
		return
	}
	var o options
	flag.IntVar(&o.sizeMiB, "size", 256, "bulk: MiB sent on each connection")
	flag.IntVar(&o.parallel, "parallel", 8, "bulk: connections of the parallel run")
	flag.IntVar(&o.requests, "requests", 10000, "latency: requests of the single client")
	flag.IntVar(&o.clients, "clients", 64, "latency: concurrent clients of the loaded run")
	flag.IntVar(&o.requestsPer, "requests-per-client", 1000, "latency: requests per client of the loaded run")
	flag.IntVar(&o.msgSize, "msg", 64, "latency and connections: request and reply size in bytes")
	flag.IntVar(&o.conns, "conns", 10000, "connection rate: connections made (connect, one request, close)")
	flag.IntVar(&o.connWorkers, "conn-workers", 16, "connection rate: concurrent connecting clients")
	flag.IntVar(&o.idle, "idle", 10000, "memory: idle proxied connections held open")
	flag.IntVar(&o.reps, "reps", 3, "repetitions; every figure is the median")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "bound on each single measurement")
	flag.StringVar(&o.paths, "paths", "direct,socat,haproxy,relay1,relay2,tcpproxy,tcpproxy-tcp,duplex,memory,tun,tunrelay", "paths to measure (comma-separated; relay1 is one plain Go relay, the floor of any user-space proxy; relay2 is two in a chain, the floor of a two-proxy design whose proxies talk TCP; tcpproxy-tcp is tcpproxy with sessions over TCP instead of the same-host Unix socket; tunrelay is one gVisor relay on a TUN device, the floor of a proxy on one)")
	flag.StringVar(&o.out, "out", "bench/results.md", "results file, relative to the module root")
	flag.BoolVar(&o.install, "install", true, "apt-get install socat and haproxy when missing (root only)")
	flag.StringVar(&o.tests, "tests", "memory,bulk,latency,connect", "measurements to run (comma-separated)")
	flag.StringVar(&o.pprofDir, "pprof", "", "save CPU profiles of the tcpproxy processes, one per measurement of the first repetition, in this directory")
	flag.StringVar(&o.binary, "binary", "", "use this tcpproxy binary instead of building ./cmd/tcpproxy (to compare builds)")
	flag.Parse()
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")

	kids := &children{}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		log.Printf("%v: killing child processes", s)
		kids.killAll()
		os.Exit(130)
	}()
	err := run(context.Background(), o, kids)
	kids.killAll()
	if err != nil {
		log.Printf("error: %v", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, kids *children) error {
	if o.reps < 1 || o.parallel < 1 || o.clients < 1 || o.requests < 1 || o.requestsPer < 1 ||
		o.msgSize < 1 || o.conns < 1 || o.connWorkers < 1 || o.idle < 0 || o.sizeMiB < 1 {
		return errors.New("every count and size must be positive (-idle may be 0 to skip memory)")
	}
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	fileLimit := raiseFileLimit(o.idle)
	if need := uint64(o.idle + 2000); fileLimit < need {
		return fmt.Errorf("RLIMIT_NOFILE is %d; -idle %d needs about %d (lower -idle)", fileLimit, o.idle, need)
	}
	dir, err := os.MkdirTemp("", "tcpproxy-bench")
	if err != nil {
		return err
	}
	kids.atExit(func() { os.RemoveAll(dir) })

	missing := ensureTools(o.install, log.Printf)
	bin := o.binary
	if bin == "" {
		bin = filepath.Join(dir, "tcpproxy")
		log.Printf("building tcpproxy")
		build := exec.Command("go", "build", "-o", bin, "./cmd/tcpproxy")
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./cmd/tcpproxy: %v\n%s", err, out)
		}
	}
	ips, err := serverIPs()
	if err != nil {
		return err
	}
	srv, err := startServers(kids, dir, ips)
	if err != nil {
		return err
	}
	e := &env{dir: dir, binary: bin, srv: srv, kids: kids, timeout: o.timeout, fileLimit: fileLimit}

	all := map[string]func(*env) *path{
		"direct": directPath, "socat": socatPath, "haproxy": haproxyPath, "relay1": relayPath, "relay2": relayChainPath, "tunrelay": tunRelayPath,
		"tcpproxy": tcpproxyPath, "tcpproxy-tcp": tcpproxyTCPPath, "duplex": duplexPath, "memory": memoryPath, "tun": tunPath,
	}
	var paths []*path
	seen := map[string]bool{}
	for _, k := range strings.Split(o.paths, ",") {
		k = strings.TrimSpace(k)
		if seen[k] {
			continue
		}
		seen[k] = true
		mk, ok := all[k]
		if !ok {
			return fmt.Errorf("-paths: unknown path %q (want direct, socat, haproxy, relay1, relay2, tcpproxy, tcpproxy-tcp, duplex, memory, tun, tunrelay)", k)
		}
		p := mk(e)
		if missing[k] {
			p.skip = k + " is not installed"
		}
		paths = append(paths, p)
	}

	res := newResults(paths, o.reps)
	res.loadStart = loadavg()
	start := time.Now()
	for rep := range o.reps {
		e.rep, res.cur = rep, rep
		for _, p := range paths {
			if p.skip != "" {
				continue
			}
			if srv.child.exited() {
				return fmt.Errorf("the server process exited: %v\n%s", srv.child.err, srv.child.tail())
			}
			log.Printf("repetition %d/%d: %s", rep+1, o.reps, p.name)
			measurePath(ctx, e, o, p, res)
		}
	}
	res.loadEnd = loadavg()
	res.elapsed = time.Since(start)

	report := res.markdown(o)
	fmt.Println()
	fmt.Println(report)
	out := o.out
	if !filepath.IsAbs(out) {
		out = filepath.Join(root, out)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
		return err
	}
	log.Printf("wrote %s (%v)", out, res.elapsed.Round(time.Second))
	return nil
}

// measurePath runs one repetition of every measurement on p, with p's
// processes started fresh.
func measurePath(ctx context.Context, e *env, o options, p *path, res *results) {
	if p.setup != nil {
		if err := p.setup(ctx, p); err != nil {
			log.Printf("%s: setup: %v", p.name, err)
			res.fail(p, "setup", err)
			p.teardown()
			return
		}
		defer p.teardown()
	}
	record := func(metric string, v float64, err error) {
		if err == nil {
			err = p.alive()
		}
		if err != nil {
			log.Printf("%s: %s: %v", p.name, metric, err)
			res.fail(p, metric, err)
			return
		}
		res.add(p, metric, v)
	}
	settle := func() { time.Sleep(200 * time.Millisecond) }

	// Memory first, while the processes are fresh: the Go runtime keeps
	// memory it has used, so a later baseline would hide the growth.
	if o.idle > 0 && p.memory && o.runs("memory") {
		rss, gor, err := measureIdle(ctx, o, p)
		record("rss", rss, err)
		if err == nil && len(p.admins) > 0 {
			res.add(p, "goroutines", gor)
		}
		settle()
	}
	size := int64(o.sizeMiB) << 20
	// profile takes CPU profiles of p's tcpproxy processes while a
	// measurement runs (first repetition only, with -pprof).
	profile := func(name string) func() {
		if o.pprofDir == "" || e.rep != 0 || len(p.admins) == 0 {
			return func() {}
		}
		return startProfiles(ctx, o.pprofDir, p, name)
	}
	for _, bc := range []struct {
		key   string
		conns int
	}{{"bulk1", 1}, {"bulkN", o.parallel}} {
		if !o.runs("bulk") {
			break
		}
		cpu0, cerr := e.cpu(p)
		done := profile(bc.key)
		v, err := bulk(ctx, p.dialer(), p.sink, size, bc.conns, o.timeout)
		done()
		record(bc.key, v, err)
		// The CPU every process of the measurement used (load generator,
		// sink, proxies, with the kernel's work on their behalf) per GiB
		// moved. socat's per-connection processes count once reaped.
		time.Sleep(300 * time.Millisecond)
		cpu1, cerr2 := e.cpu(p)
		if err == nil && cerr == nil && cerr2 == nil {
			gib := float64(size) * float64(bc.conns) / (1 << 30)
			res.add(p, bc.key+"_cpu", (cpu1-cpu0).Seconds()/gib)
		}
		settle()
	}
	for _, lc := range []struct {
		key            string
		clients, count int
	}{{"lat1", 1, o.requests}, {"latN", o.clients, o.requestsPer}} {
		if !o.runs("latency") {
			break
		}
		done := profile(lc.key)
		cpu0, cerr := e.cpu(p)
		l, err := latency(ctx, p.dialer(), p.echo, lc.clients, lc.count, o.msgSize, o.timeout)
		cpu1, cerr2 := e.cpu(p)
		done()
		record(lc.key+"_p50", us(l.p50), err)
		if err == nil {
			res.add(p, lc.key+"_p99", us(l.p99))
			res.add(p, lc.key+"_p999", us(l.p999))
			if cerr == nil && cerr2 == nil {
				// Includes the warm-up requests: 50 per client.
				n := float64(lc.clients * (lc.count + 50))
				res.add(p, lc.key+"_cpu", us(cpu1-cpu0)/n)
			}
		}
		settle()
	}
	if o.runs("connect") {
		done := profile("connect")
		cpu0, cerr := e.cpu(p)
		v, err := connRate(ctx, p.dialer(), p.echo, o.conns, o.connWorkers, o.msgSize, o.timeout)
		time.Sleep(300 * time.Millisecond) // socat's processes are reaped
		cpu1, cerr2 := e.cpu(p)
		done()
		record("cps", v, err)
		if err == nil && cerr == nil && cerr2 == nil {
			res.add(p, "cps_cpu", us(cpu1-cpu0)/float64(o.conns))
		}
	}
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// measureIdle opens o.idle (at most p.maxIdle) connections through p and returns the growth of
// its processes' RSS per connection in KiB, and of their goroutines per
// connection.
func measureIdle(ctx context.Context, o options, p *path) (rssPerConn, gorPerConn float64, err error) {
	// One connection first so that every lazily started part (sessions,
	// pools) is in the baseline.
	if err := roundTrip(ctx, p.dialer(), p.echo); err != nil {
		return 0, 0, err
	}
	time.Sleep(300 * time.Millisecond)
	rss0, err := p.rss()
	if err != nil {
		return 0, 0, err
	}
	a0, err := p.adminSum(ctx, true)
	if err != nil {
		return 0, 0, err
	}
	g0 := a0.Goroutines
	idle := o.idle
	if p.maxIdle > 0 && idle > p.maxIdle {
		idle = p.maxIdle
	}
	p.idleN = idle
	conns, err := openIdle(ctx, p.dialer(), p.echo, idle, 32, o.msgSize, o.timeout)
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		closeAll(conns)
		// Let the path release them before the next measurement.
		if len(p.admins) > 0 {
			_ = waitFor(ctx, 30*time.Second, func() error {
				g, err := p.goroutines(ctx)
				if err == nil && g > g0+10 {
					err = fmt.Errorf("%d goroutines, %d before", g, g0)
				}
				return err
			})
		} else {
			time.Sleep(time.Second)
		}
	}()
	// Let deferred work finish (goroutines parking, buffers returning).
	time.Sleep(time.Second)
	rss1, err := p.rss()
	if err != nil {
		return 0, 0, err
	}
	a1, err := p.adminSum(ctx, true)
	if err != nil {
		return 0, 0, err
	}
	n := float64(idle)
	if len(p.admins) > 0 {
		log.Printf("%s: per idle connection: RSS %.1f KiB, Go heap in use %.1f KiB, stacks %.1f KiB, goroutines %.2f",
			p.name, float64(rss1-rss0)/n, float64(a1.HeapInuse-a0.HeapInuse)/1024/n,
			float64(a1.StackInuse-a0.StackInuse)/1024/n, float64(a1.Goroutines-g0)/n)
	}
	return float64(rss1-rss0) / n, float64(a1.Goroutines-g0) / n, nil
}

// cpu sums the CPU time of the bench, its server process and p's processes.
func (e *env) cpu(p *path) (time.Duration, error) {
	pids := []int{os.Getpid(), e.srv.child.pid()}
	for _, c := range append(p.procs, p.cpuProcs...) {
		pids = append(pids, c.pid())
	}
	var sum time.Duration
	for _, pid := range pids {
		t, err := cpuTime(pid)
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// rss sums the resident set of the path's processes, in KiB.
func (p *path) rss() (int64, error) {
	var sum int64
	for _, c := range p.procs {
		v, err := rssKiB(c.pid())
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}

// goroutines sums the goroutines of the path's tcpproxy processes.
func (p *path) goroutines(ctx context.Context) (int, error) {
	v, err := p.adminSum(ctx, false)
	return v.Goroutines, err
}

// adminSum sums the admin figures of the path's tcpproxy processes.
func (p *path) adminSum(ctx context.Context, memstats bool) (adminVars, error) {
	var sum adminVars
	for _, a := range p.admins {
		v, err := adminQuery(ctx, p.httpClient(), a, memstats)
		if err != nil {
			return sum, err
		}
		sum.Goroutines += v.Goroutines
		sum.HeapInuse += v.HeapInuse
		sum.StackInuse += v.StackInuse
		sum.Sys += v.Sys
	}
	return sum, nil
}

// raiseFileLimit lifts RLIMIT_NOFILE for the bench and, by inheritance, its
// children, and returns the resulting limit. With idle connections open, the
// bench and its server process hold one descriptor per connection each, a
// tcpproxy process one, haproxy two. Without CAP_SYS_RESOURCE (containers)
// only the soft limit can be raised, up to the hard one.
func raiseFileLimit(idle int) uint64 {
	want := uint64(2*idle + 65536)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	if lim.Max < want {
		raised := lim
		raised.Max, raised.Cur = want, want
		if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
			var nrOpen uint64
			if _, err := fmt.Sscan(string(b), &nrOpen); err == nil && nrOpen < want {
				raised.Max, raised.Cur = nrOpen, nrOpen
			}
		}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
			return raised.Cur
		}
	}
	lim.Cur = lim.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Cur
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run the bench from inside the tcpproxy module (go run ./scripts/bench)")
	}
	return filepath.Dir(mod), nil
}
