// Command bench measures tcpproxy against direct TCP, plain relays (the
// floors), haproxy, stunnel and socat, side by side on this machine, and
// writes bench/results.md, a chart of the cross-host results
// (bench/results.svg) and a short summary for the README
// (bench/summary.md):
//
//	go run ./scripts/bench            # full run, about 10 minutes on 2 CPUs
//	go run ./scripts/bench -quick     # a short development run, cross-host only
//	go run ./scripts/bench -h         # sizes, counts, repetitions, paths
//
// The cross-host paths (x-*) are the deployment topology: two network
// namespaces joined by a veth pair, the load generator and the client-side
// proxy on one, the server-side proxy and the bench's servers on the
// other: direct TCP, two relays (splicing: the floor; copying; and with
// mutual TLS), an haproxy pair (plain and with mutual TLS), a stunnel pair,
// a gVisor relay on a TUN (the TUN floor), and tcpproxy with plaintext
// sessions, mutual TLS, the client on network: tun, and tun on both hosts.
// Every repetition also measures what sealing and opening a GiB costs with
// the cipher suite tcpproxy's TLS negotiates. The same-host paths follow:
// direct TCP, socat, haproxy, one and two plain Go relays, a gVisor relay
// on a TUN, and tcpproxy request→reply (same-host socket, and TCP), duplex,
// and the memory and tun networks.
//
// It installs socat, haproxy and stunnel4 with apt-get when they are
// missing and it runs as root, builds cmd/tcpproxy, and drives every path
// with its own Go load generator against its own echo and sink servers (a
// child process). Only 127.0.0.0/8 and addresses inside the namespaces it
// makes are used; every load loop is bounded in count and time; every
// child process is killed and every namespace deleted at the end, also on
// error or Ctrl-C, and a later run deletes what a killed one left.
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
	"slices"
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
	sameReps    int
	timeout     time.Duration
	paths       string
	out         string
	install     bool
	binary      string
	tests       string
	pprofDir    string
	quick       bool
	svg, sum    string
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
	flag.IntVar(&o.requests, "requests", 5000, "latency: requests of the single client")
	flag.IntVar(&o.clients, "clients", 64, "latency: concurrent clients of the loaded run")
	flag.IntVar(&o.requestsPer, "requests-per-client", 500, "latency: requests per client of the loaded run")
	flag.IntVar(&o.msgSize, "msg", 64, "latency and connections: request and reply size in bytes")
	flag.IntVar(&o.conns, "conns", 5000, "connection rate: connections made (connect, one request, close)")
	flag.IntVar(&o.connWorkers, "conn-workers", 16, "connection rate: concurrent connecting clients")
	flag.IntVar(&o.idle, "idle", 10000, "memory: idle proxied connections held open (same-host tcpproxy paths)")
	flag.IntVar(&o.reps, "reps", 3, "repetitions of the cross-host paths; every figure is the median")
	flag.IntVar(&o.sameReps, "same-reps", 1, "repetitions of the same-host paths (the cross-host ones lead; this keeps the whole run near 10 minutes)")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "bound on each single measurement")
	flag.StringVar(&o.paths, "paths", strings.Join(append(slices.Clone(crossPaths), samePaths...), ","), "paths to measure (comma-separated); x-* span two hosts (network namespaces joined by veth), the others one: "+pathHelp)
	flag.StringVar(&o.out, "out", "bench/results.md", "results file, relative to the module root")
	flag.StringVar(&o.svg, "svg", "bench/results.svg", "chart of the cross-host results, relative to the module root (empty: none)")
	flag.StringVar(&o.sum, "summary", "bench/summary.md", "short summary of the cross-host results, relative to the module root (empty: none)")
	flag.BoolVar(&o.install, "install", true, "apt-get install socat, haproxy, stunnel4 when missing (root only)")
	flag.StringVar(&o.tests, "tests", "memory,bulk,latency,connect", "measurements to run (comma-separated)")
	flag.StringVar(&o.pprofDir, "pprof", "", "save CPU profiles of the tcpproxy processes, one per measurement of the first repetition, in this directory")
	flag.StringVar(&o.binary, "binary", "", "use this tcpproxy binary instead of building ./cmd/tcpproxy (to compare builds)")
	flag.BoolVar(&o.quick, "quick", false, "a short run for development: the cross-host paths only (unless -paths), one repetition, smaller counts (flags given explicitly win); writes nothing unless -out is given")
	flag.Parse()
	if o.quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]func(){
			"paths":               func() { o.paths = strings.Join(crossPaths, ",") },
			"reps":                func() { o.reps = 1 },
			"same-reps":           func() { o.sameReps = 1 },
			"size":                func() { o.sizeMiB = 128 },
			"requests":            func() { o.requests = 2000 },
			"requests-per-client": func() { o.requestsPer = 200 },
			"conns":               func() { o.conns = 2000 },
			"idle":                func() { o.idle = 2000 },
			"out":                 func() { o.out = "" },
			"svg":                 func() { o.svg = "" },
			"summary":             func() { o.sum = "" },
		}
		for name, f := range quick {
			if !set[name] {
				f()
			}
		}
	}
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
	if o.reps < 1 || o.sameReps < 1 || o.parallel < 1 || o.clients < 1 || o.requests < 1 || o.requestsPer < 1 ||
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

	sweepNamespaces()
	if e.certs, err = makeCerts(bin, dir); err != nil {
		return err
	}
	if e.suite, err = negotiatedSuite(e.certs); err != nil {
		return err
	}
	var paths []*path
	seen := map[string]bool{}
	for _, k := range strings.Split(o.paths, ",") {
		k = strings.TrimSpace(k)
		if seen[k] || k == "" {
			continue
		}
		seen[k] = true
		mk, ok := allPaths[k]
		if !ok {
			return fmt.Errorf("-paths: unknown path %q (want %s)", k, strings.Join(append(slices.Clone(crossPaths), samePaths...), ", "))
		}
		p := mk(e)
		if tool := toolOf[k]; missing[tool] && p.skip == "" {
			p.skip = tool + " is not installed"
		}
		paths = append(paths, p)
	}

	reps := max(o.reps, o.sameReps)
	res := newResults(paths, reps)
	res.loadStart = loadavg()
	res.suite = e.suite.name
	start := time.Now()
	for rep := range reps {
		e.rep, res.cur = rep, rep
		if rep < o.reps && slices.ContainsFunc(paths, func(p *path) bool { return p.cross && p.skip == "" }) {
			// The floor of mutual TLS: the cipher's own cost, measured
			// between the paths so that it sees the same machine.
			v, err := sealOpenCost(e.suite, 512<<20)
			if err != nil {
				log.Printf("cipher cost: %v", err)
			} else {
				res.addCipher(v)
			}
		}
		for _, p := range paths {
			if p.skip != "" || (p.cross && rep >= o.reps) || (!p.cross && rep >= o.sameReps) {
				continue
			}
			if srv.child.exited() {
				return fmt.Errorf("the server process exited: %v\n%s", srv.child.err, srv.child.tail())
			}
			log.Printf("repetition %d/%d: %s", rep+1, reps, p.name)
			measurePath(ctx, e, o, p, res)
		}
	}
	res.loadEnd = loadavg()
	res.elapsed = time.Since(start)

	report := res.markdown(o)
	fmt.Println()
	fmt.Println(report)
	write := func(name, body string) error {
		if name == "" {
			return nil
		}
		if !filepath.IsAbs(name) {
			name = filepath.Join(root, name)
		}
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(name, []byte(body), 0o644); err != nil {
			return err
		}
		log.Printf("wrote %s", name)
		return nil
	}
	if err := write(o.out, report); err != nil {
		return err
	}
	if res.anyCross() {
		if err := write(o.svg, res.svg(o)); err != nil {
			return err
		}
		if err := write(o.sum, res.summary(o)); err != nil {
			return err
		}
	}
	log.Printf("done in %v", res.elapsed.Round(time.Second))
	return nil
}

// measurePath runs one repetition of every measurement on p, with p's
// processes started fresh.
func measurePath(ctx context.Context, e *env, o options, p *path, res *results) {
	if p.tests != "" {
		o.tests = p.tests
	}
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
		cpu0 := e.cpuSnap(p)
		done := profile(bc.key)
		v, err := bulk(ctx, p.dialer(), p.sink, size, bc.conns, o.timeout)
		machine, merr := machineCPU()
		done()
		record(bc.key, v, err)
		// The CPU every process of the measurement used (load generator,
		// sink, proxies, with the kernel's work on their behalf) per GiB
		// moved. socat's per-connection processes count once reaped; the
		// machine's time is taken at once, without the wait.
		time.Sleep(300 * time.Millisecond)
		if err == nil {
			gib := float64(size) * float64(bc.conns) / (1 << 30)
			cpu1 := e.cpuSnap(p)
			cpu1.machine, cpu1.err = machine, errors.Join(cpu1.err, merr)
			cpu1.sub(cpu0).record(res, p, bc.key, func(d time.Duration) float64 { return d.Seconds() / gib })
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
		cpu0 := e.cpuSnap(p)
		l, err := latency(ctx, p.dialer(), p.echo, lc.clients, lc.count, o.msgSize, o.timeout)
		cpu1 := e.cpuSnap(p)
		done()
		record(lc.key+"_p50", us(l.p50), err)
		if err == nil {
			res.add(p, lc.key+"_p99", us(l.p99))
			res.add(p, lc.key+"_p999", us(l.p999))
			// Includes the warm-up requests: 50 per client.
			n := float64(lc.clients * (lc.count + 50))
			cpu1.sub(cpu0).record(res, p, lc.key, func(d time.Duration) float64 { return us(d) / n })
		}
		settle()
	}
	if o.runs("connect") {
		done := profile("connect")
		cpu0 := e.cpuSnap(p)
		v, err := connRate(ctx, p.dialer(), p.echo, o.conns, o.connWorkers, o.msgSize, o.timeout)
		machine, merr := machineCPU()
		time.Sleep(300 * time.Millisecond) // socat's processes are reaped
		cpu1 := e.cpuSnap(p)
		cpu1.machine, cpu1.err = machine, errors.Join(cpu1.err, merr)
		done()
		record("cps", v, err)
		if err == nil {
			cpu1.sub(cpu0).record(res, p, "cps", func(d time.Duration) float64 { return us(d) / float64(o.conns) })
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

// cpuSnap is a reading of three CPU clocks: the CPU time of every process
// a measurement involves (the bench with its load generator, the servers,
// p's processes), of p's proxy processes alone, and the machine's non-idle
// time (every CPU, every process: what a dedicated machine would show; on
// a shared one, other load too).
type cpuSnap struct {
	involved, proxies, machine time.Duration
	err                        error
}

func (e *env) cpuSnap(p *path) cpuSnap {
	var s cpuSnap
	sum := func(pids []int) time.Duration {
		var t time.Duration
		for _, pid := range pids {
			v, err := cpuTime(pid)
			if err != nil && s.err == nil {
				s.err = err
			}
			t += v
		}
		return t
	}
	var proxies, others []int
	for _, c := range p.procs {
		proxies = append(proxies, c.pid())
	}
	others = []int{os.Getpid(), e.srv.child.pid()}
	for _, c := range p.cpuProcs {
		others = append(others, c.pid())
	}
	s.proxies = sum(proxies)
	s.involved = s.proxies + sum(others)
	var err error
	if s.machine, err = machineCPU(); err != nil && s.err == nil {
		s.err = err
	}
	return s
}

func (s cpuSnap) sub(o cpuSnap) cpuSnap {
	return cpuSnap{s.involved - o.involved, s.proxies - o.proxies, s.machine - o.machine, errors.Join(s.err, o.err)}
}

// record adds the three clocks, each scaled by per, as metric_cpu
// (involved), metric_pcpu (proxies) and metric_mcpu (machine).
func (s cpuSnap) record(res *results, p *path, metric string, per func(time.Duration) float64) {
	if s.err != nil {
		return
	}
	res.add(p, metric+"_cpu", per(s.involved))
	if len(p.procs) > 0 {
		res.add(p, metric+"_pcpu", per(s.proxies))
	}
	res.add(p, metric+"_mcpu", per(s.machine))
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
