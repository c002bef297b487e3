package main

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// The paths, in the order of the tables: the cross-host ones first (the
// deployment topology), then the same-host ones.
var (
	crossPaths = []string{"x-direct", "x-relay2", "x-haproxy", "x-tcpproxy", "x-tunrelay", "x-tun", "x-tun2", "x-relay2-copy", "x-relay2-tls", "x-haproxy-tls", "x-stunnel", "x-mtls"}
	samePaths  = []string{"direct", "socat", "haproxy", "relay1", "relay2", "tcpproxy", "tcpproxy-tcp", "duplex", "memory", "tun", "tunrelay"}
	allPaths   = map[string]func(*env) *path{
		"x-direct": xDirectPath, "x-relay2": xRelayPath(false, false), "x-relay2-tls": xRelayPath(true, false), "x-relay2-copy": xRelayPath(false, true), "x-tunrelay": xTUNRelayPath, "x-haproxy": xHaproxyPath(false), "x-haproxy-tls": xHaproxyPath(true),
		"x-stunnel":  xStunnelPath,
		"x-tcpproxy": xTCPProxyPath("x-tcpproxy", "tcpproxy, plaintext sessions", false, false, false),
		"x-mtls":     xTCPProxyPath("x-mtls", "tcpproxy, mutual TLS sessions", true, false, false),
		"x-tun":      xTCPProxyPath("x-tun", "tcpproxy, client on network: tun", false, true, false),
		"x-tun2":     xTCPProxyPath("x-tun2", "tcpproxy, network: tun on both hosts", false, true, true),

		"direct": directPath, "socat": socatPath, "haproxy": haproxyPath, "relay1": relayPath, "relay2": relayChainPath, "tunrelay": tunRelayPath,
		"tcpproxy": tcpproxyPath, "tcpproxy-tcp": tcpproxyTCPPath, "duplex": duplexPath, "memory": memoryPath, "tun": tunPath,
	}
	// toolOf names the program a path needs that the bench installs.
	toolOf = map[string]string{"socat": "socat", "haproxy": "haproxy", "x-haproxy": "haproxy", "x-haproxy-tls": "haproxy", "x-stunnel": "stunnel4"}
)

const pathHelp = "relay1 is one plain Go relay, the floor of any user-space proxy; relay2 (and x-relay2) two in a chain, the floor of a two-proxy design whose proxies talk TCP; tcpproxy-tcp is tcpproxy with sessions over TCP instead of the same-host Unix socket; tunrelay is one gVisor relay on a TUN device, the floor of a proxy on one; x-tun has the client instance on network: tun, x-tun2 both; x-mtls has mutual TLS sessions"

// path is one way from the load generator to the bench's servers.
type path struct {
	key, name string
	// setup starts the path's processes (fresh for every repetition) and
	// fills in the fields below; nil for direct TCP.
	setup func(ctx context.Context, p *path) error
	// skip, when set, says why the path is not measured.
	skip string
	// cross says the path spans two hosts (the cross-host table).
	cross bool
	// tests, when set, replaces -tests for this path (floors measured for
	// bulk only).
	tests string
	// memory reports whether RSS per idle connection is measured.
	memory bool
	// memoryNote is shown instead of a memory figure when memory is false.
	memoryNote string
	// maxIdle, when positive, caps the idle connections of the memory
	// measurement (haproxy needs two descriptors per connection).
	maxIdle int
	idleN   int // idle connections of the last memory measurement

	// Set by setup.
	echo, sink string   // where clients connect
	procs      []*child // the processes whose RSS is the path's memory
	cpuProcs   []*child // more processes whose CPU time counts
	admins     []string // tcpproxy admin addresses (goroutine counts)
	// dial connects the load generator (nil: kernelDial); adminClient
	// reaches the admin endpoints (nil: http.DefaultClient).
	dial        dialFunc
	adminClient *http.Client
	// cleanups are called by teardown, last first, after the processes
	// are killed.
	cleanups []func()
}

// addCleanup registers f to run at teardown.
func (p *path) addCleanup(f func()) { p.cleanups = append(p.cleanups, f) }

func (p *path) httpClient() *http.Client {
	if p.adminClient != nil {
		return p.adminClient
	}
	return http.DefaultClient
}

func (p *path) dialer() dialFunc {
	if p.dial != nil {
		return p.dial
	}
	return kernelDial
}

func (p *path) teardown() {
	for _, c := range append(p.procs, p.cpuProcs...) {
		c.kill()
	}
	for i := len(p.cleanups) - 1; i >= 0; i-- {
		p.cleanups[i]()
	}
	p.procs, p.cpuProcs, p.admins, p.dial, p.adminClient, p.cleanups = nil, nil, nil, nil, nil, nil
}

// alive fails when one of the path's processes has exited.
func (p *path) alive() error {
	for _, c := range p.procs {
		if c.exited() {
			return fmt.Errorf("%s exited: %v\n%s", c.name, c.err, c.tail())
		}
	}
	return nil
}

// env is what path setups share.
type env struct {
	dir     string // temporary files and logs
	binary  string // tcpproxy
	srv     *serverProc
	kids    *children
	timeout time.Duration
	rep     int
	// fileLimit is the RLIMIT_NOFILE of the bench and its children.
	fileLimit uint64
	// certs are the TLS paths' certificates, and suite the cipher suite
	// tcpproxy negotiates with them.
	certs *certFiles
	suite tlsSuite
}

func (e *env) waitReady(ctx context.Context, p *path) error {
	err := waitFor(ctx, 20*time.Second, func() error {
		if err := p.alive(); err != nil {
			return err
		}
		if err := roundTrip(ctx, p.dialer(), p.echo); err != nil {
			return err
		}
		c, err := p.dialer()(ctx, p.sink)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		var logs []string
		for _, c := range p.procs {
			logs = append(logs, fmt.Sprintf("--- %s log:\n%s", c.name, c.tail()))
		}
		return fmt.Errorf("%s: %w\n%s", p.name, err, strings.Join(logs, "\n"))
	}
	return nil
}

func directPath(e *env) *path {
	return &path{
		key: "direct", name: "direct TCP",
		echo:       fmt.Sprintf("127.0.0.1:%d", e.srv.echoPort),
		sink:       fmt.Sprintf("127.0.0.1:%d", e.srv.sinkPort),
		memoryNote: "— (kernel only)",
	}
}

func socatPath(e *env) *path {
	return &path{
		key: "socat", name: "socat relay",
		memoryNote: "n/a (a process per connection)",
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(2)
			if err != nil {
				return err
			}
			for i, t := range []struct {
				name string
				port int
				addr *string
			}{{"echo", e.srv.echoPort, &p.echo}, {"sink", e.srv.sinkPort, &p.sink}} {
				lp := ports[i]
				c, err := e.kids.start(fmt.Sprintf("socat-%s-%d", t.name, e.rep), e.dir, "socat",
					fmt.Sprintf("TCP-LISTEN:%d,fork,reuseaddr,bind=127.0.0.1", lp),
					fmt.Sprintf("TCP:127.0.0.1:%d", t.port))
				if err != nil {
					return err
				}
				p.procs = append(p.procs, c)
				*t.addr = fmt.Sprintf("127.0.0.1:%d", lp)
			}
			return e.waitReady(ctx, p)
		},
	}
}

const haproxyConfig = `global
    nbthread 2
    maxconn %[5]d
defaults
    mode tcp
    maxconn %[5]d
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend echo
    bind 127.0.0.1:%[1]d
    default_backend echo
backend echo
    server echo 127.0.0.1:%[2]d
frontend sink
    bind 127.0.0.1:%[3]d
    default_backend sink
backend sink
    server sink 127.0.0.1:%[4]d
`

func haproxyPath(e *env) *path {
	// haproxy needs two descriptors per connection and refuses to start
	// when maxconn does not fit the file limit.
	maxconn := int(e.fileLimit-1000) / 2
	return &path{
		key: "haproxy", name: "haproxy (TCP mode, 2 threads)", memory: true, maxIdle: maxconn - 500,
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(2)
			if err != nil {
				return err
			}
			ep, sp := ports[0], ports[1]
			cfg := filepath.Join(e.dir, fmt.Sprintf("haproxy-%d.cfg", e.rep))
			body := fmt.Sprintf(haproxyConfig, ep, e.srv.echoPort, sp, e.srv.sinkPort, maxconn)
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				return err
			}
			c, err := e.kids.start(fmt.Sprintf("haproxy-%d", e.rep), e.dir, "haproxy", "-db", "-f", cfg)
			if err != nil {
				return err
			}
			p.procs = append(p.procs, c)
			p.echo, p.sink = fmt.Sprintf("127.0.0.1:%d", ep), fmt.Sprintf("127.0.0.1:%d", sp)
			return e.waitReady(ctx, p)
		},
	}
}

// tcpproxyInstance is one `tcpproxy run` configuration.
type tcpproxyInstance struct {
	iid, role      string
	listen, admin  int
	host           netip.Addr // where listen is; zero: 127.0.0.1
	ns             *netns     // where it runs; nil: the bench's namespace
	ranges         string     // addressing block, empty for the defaults
	transport      string     // transport block, empty for the defaults
	extra          string     // more top-level YAML (network, tun, tls)
	channels       string     // YAML lines of the channels block
	servesChannels string     // the member's channels map in the members list
}

func (in *tcpproxyInstance) listenAddr() string {
	h := in.host
	if !h.IsValid() {
		h = netip.MustParseAddr("127.0.0.1")
	}
	return netip.AddrPortFrom(h, uint16(in.listen)).String()
}

// startTCPProxies writes the configurations of insts, each listing all of
// them as static members, and starts them.
func (e *env) startTCPProxies(p *path, insts []*tcpproxyInstance) error {
	var members strings.Builder
	members.WriteString("members:\n  static:\n")
	for _, in := range insts {
		fmt.Fprintf(&members, "    - {iid: %s, role: %s, addr: \"%s\", channels: {%s}}\n", in.iid, in.role, in.listenAddr(), in.servesChannels)
	}
	for _, in := range insts {
		body := fmt.Sprintf("iid: %s\nrole: %s\nlisten: %s\nadmin: 127.0.0.1:%d\n%s%s%s%schannels:\n%slog: {level: warn}\ndrainTimeout: 1s\n",
			in.iid, in.role, in.listenAddr(), in.admin, in.ranges, in.transport, in.extra, members.String(), in.channels)
		cfg := filepath.Join(e.dir, fmt.Sprintf("%s-%s-%d.yaml", p.key, in.iid, e.rep))
		if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
			return err
		}
		argv := []string{e.binary, "run", "-config", cfg}
		if in.ns != nil {
			argv = append(in.ns.pre(), argv...)
		}
		c, err := e.kids.start(fmt.Sprintf("%s-%s-%d", p.key, in.iid, e.rep), e.dir, argv...)
		if err != nil {
			return err
		}
		p.procs = append(p.procs, c)
		p.admins = append(p.admins, fmt.Sprintf("127.0.0.1:%d", in.admin))
	}
	return nil
}

// tcpproxyPath is the request→reply path: a client instance with request
// channels echo and sink, a server instance replying on them, with the
// default address ranges of a deployment (as in cmd/tcpproxy's e2e tests).
// Its sessions take the same-host Unix socket, the default.
func tcpproxyPath(e *env) *path {
	return requestReplyPath(e, "tcpproxy", "tcpproxy request→reply (loopback)", "", true)
}

// tcpproxyTCPPath is tcpproxyPath with sessions over TCP, as between
// proxies on different hosts (transport.sameHost: tcp).
func tcpproxyTCPPath(e *env) *path {
	return requestReplyPath(e, "tcpproxy-tcp", "tcpproxy request→reply (loopback, sessions over TCP)", "transport: {sameHost: tcp}\n", false)
}

func requestReplyPath(e *env, key, name, transport string, memory bool) *path {
	return &path{
		key: key, name: name, memory: memory,
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(4)
			if err != nil {
				return err
			}
			reqIPs, err := proxy.RequestIPs(proxy.DefaultRequestRange, []string{"echo", "sink"})
			if err != nil {
				return err
			}
			ep, sp := e.srv.echoPort, e.srv.sinkPort
			insts := []*tcpproxyInstance{
				{iid: "bench-srv", role: "bench-server", listen: ports[0], admin: ports[1], transport: transport,
					channels:       fmt.Sprintf("  echo: {kind: reply, port: %d}\n  sink: {kind: reply, port: %d}\n", ep, sp),
					servesChannels: fmt.Sprintf("echo: %d, sink: %d", ep, sp)},
				{iid: "bench-cli", role: "bench-client", listen: ports[2], admin: ports[3], transport: transport,
					channels: fmt.Sprintf("  echo: {kind: request, port: %d}\n  sink: {kind: request, port: %d}\n", ep, sp)},
			}
			p.echo = netip.AddrPortFrom(reqIPs["echo"], uint16(ep)).String()
			p.sink = netip.AddrPortFrom(reqIPs["sink"], uint16(sp)).String()
			if err := e.startTCPProxies(p, insts); err != nil {
				return err
			}
			return e.waitReady(ctx, p)
		},
	}
}

// serverIPs are the addresses where the bench's servers listen: 127.0.0.1
// and the bind IPs of the tcpproxy instances that call them.
func serverIPs() ([]netip.Addr, error) {
	srvIP, err := proxy.NewInstanceAllocator(proxy.DefaultInstanceRange).Add("bench-srv")
	if err != nil {
		return nil, err
	}
	dxIP, err := proxy.NewInstanceAllocator(dxRangeB).Add("bench-dx-b")
	if err != nil {
		return nil, err
	}
	nsIP, err := nsServerIP()
	if err != nil {
		return nil, err
	}
	return []netip.Addr{netip.MustParseAddr("127.0.0.1"), srvIP, dxIP, nsIP}, nil
}

// Address ranges of the duplex path: the two instances share this host, so
// each needs its own (a deployment gives each its own network namespace).
var (
	dxRangeA    = netip.MustParsePrefix("127.90.0.0/16")
	dxReqRangeA = netip.MustParsePrefix("127.91.0.0/16")
	dxRangeB    = netip.MustParsePrefix("127.92.0.0/16")
	dxReqRangeB = netip.MustParsePrefix("127.93.0.0/16")
)

// duplexPath is a connect-mode instance A whose impostor for member B
// carries connections to B, which binds: legacy client → A's impostor →
// stream → B → the bench's servers on B's bind IP.
func duplexPath(e *env) *path {
	return &path{
		key: "duplex", name: "tcpproxy duplex connect→bind (loopback)", memory: true,
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(4)
			if err != nil {
				return err
			}
			aView := proxy.NewInstanceAllocator(dxRangeA)
			if _, err := aView.Add("bench-dx-a"); err != nil {
				return err
			}
			impostorIP, err := aView.Add("bench-dx-b")
			if err != nil {
				return err
			}
			ep, sp := e.srv.echoPort, e.srv.sinkPort
			insts := []*tcpproxyInstance{
				{iid: "bench-dx-b", role: "bench-peer", listen: ports[0], admin: ports[1],
					ranges:         fmt.Sprintf("addressing: {instanceRange: %s, requestRange: %s}\n", dxRangeB, dxReqRangeB),
					channels:       fmt.Sprintf("  dxecho: {kind: duplex, port: %d, mode: bind}\n  dxsink: {kind: duplex, port: %d, mode: bind}\n", ep, sp),
					servesChannels: fmt.Sprintf("dxecho: %d, dxsink: %d", ep, sp)},
				{iid: "bench-dx-a", role: "bench-peer", listen: ports[2], admin: ports[3],
					ranges:   fmt.Sprintf("addressing: {instanceRange: %s, requestRange: %s}\n", dxRangeA, dxReqRangeA),
					channels: fmt.Sprintf("  dxecho: {kind: duplex, port: %d, mode: connect}\n  dxsink: {kind: duplex, port: %d, mode: connect}\n", ep, sp)},
			}
			p.echo = netip.AddrPortFrom(impostorIP, uint16(ep)).String()
			p.sink = netip.AddrPortFrom(impostorIP, uint16(sp)).String()
			if err := e.startTCPProxies(p, insts); err != nil {
				return err
			}
			return e.waitReady(ctx, p)
		},
	}
}
