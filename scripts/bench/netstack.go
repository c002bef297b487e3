package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/netconn"
	"github.com/tcpproxy/tcpproxy/tun"
)

// The netstack paths put the client instance's legacy side in a gVisor
// stack; the server instance is a `tcpproxy run` on loopback with ranges of
// its own, as in cmd/tcpproxy's TUN end-to-end test:
//
//	memory  load generator in a gVisor "host" stack → in-memory link →
//	        client proxy (in the bench process) → session → server process
//	tun     load generator (kernel socket in a network namespace made for
//	        the run) → kernel routes into a TUN device → gVisor → client
//	        `tcpproxy run` (network: tun) → session → server process

var (
	nsSrvRange    = netip.MustParsePrefix("127.20.0.0/16")
	nsSrvReqRange = netip.MustParsePrefix("127.21.0.0/16")
)

const nsSrvIID = "bench-nsrv"

// nsServerIP is where the server instance of the netstack paths dials the
// bench's servers.
func nsServerIP() (netip.Addr, error) {
	return proxy.NewInstanceAllocator(nsSrvRange).Add(nsSrvIID)
}

// startNSServer starts the loopback server instance of a netstack path,
// with argv prefix pre (`ip netns exec NS` for the tun path).
func (e *env) startNSServer(p *path, pre []string, name string, listen, admin, ep, sp int) error {
	cfg := filepath.Join(e.dir, fmt.Sprintf("%s-%d.yaml", name, e.rep))
	body := fmt.Sprintf(`iid: %s
role: bench-server
listen: 127.0.0.1:%d
admin: 127.0.0.1:%d
addressing: {instanceRange: %s, requestRange: %s}
# Sessions are taken from members only: the clients of the netstack paths
# (the memory one runs in the bench process and does not listen).
members:
  static:
    - {iid: bench-mcli, role: bench-client}
    - {iid: bench-tcli, role: bench-client, addr: "127.0.0.1:7001"}
channels:
  echo: {kind: reply, port: %d}
  sink: {kind: reply, port: %d}
log: {level: warn}
drainTimeout: 1s
`, nsSrvIID, listen, admin, nsSrvRange, nsSrvReqRange, ep, sp)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		return err
	}
	c, err := e.kids.start(fmt.Sprintf("%s-%d", name, e.rep), e.dir, slices.Concat(pre, []string{e.binary, "run", "-config", cfg})...)
	if err != nil {
		return err
	}
	p.procs = append(p.procs, c)
	p.admins = append(p.admins, fmt.Sprintf("127.0.0.1:%d", admin))
	return nil
}

func nsMembers(listen, ep, sp int) []channels.Member {
	return []channels.Member{{IID: nsSrvIID, Role: "bench-server", Addr: fmt.Sprintf("127.0.0.1:%d", listen),
		Channels: map[string]uint16{"echo": uint16(ep), "sink": uint16(sp)}}}
}

// memoryPath: the client proxy runs in the bench process on the memory
// network, so its memory cannot be told apart from the load generator's.
func memoryPath(e *env) *path {
	return &path{
		key: "memory", name: "tcpproxy request→reply (memory network, client side)",
		memoryNote: "n/a (client proxy in the bench process)",
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(2)
			if err != nil {
				return err
			}
			ep, sp := e.srv.echoPort, e.srv.sinkPort
			if err := e.startNSServer(p, nil, "memsrv", ports[0], ports[1], ep, sp); err != nil {
				return err
			}
			logf, err := os.Create(filepath.Join(e.dir, fmt.Sprintf("memcli-%d.log", e.rep)))
			if err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelWarn}))
			network, host, err := netstack.NewMemory(netstack.Options{Logger: log})
			if err != nil {
				logf.Close()
				return err
			}
			node, err := channels.NewNode(channels.Config{IID: "bench-mcli", Role: "bench-client",
				Members: membership.Static(nsMembers(ports[0], ep, sp)...), Logger: log})
			if err != nil {
				network.Close()
				host.Close()
				logf.Close()
				return err
			}
			px, err := proxy.New(proxy.Config{IID: "bench-mcli", Role: "bench-client", Network: network, Mesh: node, Logger: log,
				Channels: map[string]proxy.ChannelConfig{
					"echo": {Kind: proxy.KindRequest, Port: ep}, "sink": {Kind: proxy.KindRequest, Port: sp}}})
			if err == nil {
				err = node.Start(ctx)
			}
			if err == nil {
				err = px.Start(ctx)
			}
			events := make(chan struct{})
			if px != nil {
				go func() {
					for range px.Events() {
					}
					close(events)
				}()
			}
			p.addCleanup(func() {
				if px != nil {
					sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					_ = px.Shutdown(sctx)
					cancel()
					<-events
				}
				_ = node.Close()
				_ = network.Close()
				_ = host.Close()
				_ = logf.Close()
			})
			if err != nil {
				return fmt.Errorf("in-process client proxy: %w", err)
			}
			echoAddr, _ := px.RequestAddr("echo")
			sinkAddr, _ := px.RequestAddr("sink")
			p.echo, p.sink = echoAddr.String(), sinkAddr.String()
			p.dial = func(ctx context.Context, addr string) (conn, error) {
				ap, err := netip.ParseAddrPort(addr)
				if err != nil {
					return nil, err
				}
				c, err := host.Dial(ctx, ap)
				if err != nil {
					return nil, err
				}
				hc, ok := c.(conn)
				if !ok {
					c.Close()
					return nil, fmt.Errorf("memory network connection %T has no CloseWrite", c)
				}
				return hc, nil
			}
			return e.waitReady(ctx, p)
		},
	}
}

// tunUsable says why the tun paths cannot run here, or "".
func tunUsable() string {
	if s := nsUsable(); s != "" {
		return s
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return "no /dev/net/tun"
	}
	return ""
}

// nsUsable says why the paths in network namespaces cannot run here, or "".
func nsUsable() string {
	if os.Geteuid() != 0 {
		return "needs root (network namespaces)"
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return "no ip command (iproute2)"
	}
	return ""
}

// tunPath runs both instances and a server process in a network namespace
// made for each repetition (and deleted after it): the TUN device and its
// routing never touch the bench's own namespace.
func tunPath(e *env) *path {
	return &path{
		key: "tun", name: "tcpproxy request→reply (tun network, client side)", memory: true,
		skip: tunUsable(),
		setup: func(ctx context.Context, p *path) error {
			pre, sp, err := e.nsSetup(p, "tunservers")
			if err != nil {
				return err
			}
			// A fresh namespace: fixed ports are free.
			if err := e.startNSServer(p, pre, "tunsrv", 7002, 7102, sp.echoPort, sp.sinkPort); err != nil {
				return err
			}
			cfg := filepath.Join(e.dir, fmt.Sprintf("tuncli-%d.yaml", e.rep))
			body := fmt.Sprintf(`iid: bench-tcli
role: bench-client
listen: 127.0.0.1:7001
admin: 127.0.0.1:7101
network: tun
tun: {name: tpbench0}
members:
  static:
    - {iid: %s, role: bench-server, addr: "127.0.0.1:7002", channels: {echo: %d, sink: %d}}
channels:
  echo: {kind: request, port: %d}
  sink: {kind: request, port: %d}
log: {level: warn}
drainTimeout: 1s
`, nsSrvIID, sp.echoPort, sp.sinkPort, sp.echoPort, sp.sinkPort)
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				return err
			}
			c, err := e.kids.start(fmt.Sprintf("tuncli-%d", e.rep), e.dir, slices.Concat(pre, []string{e.binary, "run", "-config", cfg})...)
			if err != nil {
				return err
			}
			p.procs = append(p.procs, c)
			p.admins = append(p.admins, "127.0.0.1:7101")
			reqIPs, err := proxy.RequestIPs(proxy.DefaultRequestRange, []string{"echo", "sink"})
			if err != nil {
				return err
			}
			p.echo = netip.AddrPortFrom(reqIPs["echo"], uint16(sp.echoPort)).String()
			p.sink = netip.AddrPortFrom(reqIPs["sink"], uint16(sp.sinkPort)).String()
			return e.waitReady(ctx, p)
		},
	}
}

// tunRelayAddr is where the tun relay listens, in its gVisor stack.
var tunRelayAddr = netip.MustParseAddr("127.1.0.1")

// tunRelayPath is the floor of a proxy on a TUN device: one process (this
// program with -tunrelay, in a namespace as for tunPath) whose gVisor stack
// on a TUN takes the load generator's connections, each copied through a
// buffer to and from a kernel connection to the servers (one copy out of
// gVisor, one into the kernel, as tcpproxy's client side); no sessions, no
// second process.
func tunRelayPath(e *env) *path {
	return &path{
		key: "tunrelay", name: "one relay on a TUN (gVisor, copying: the floor of a TUN proxy)",
		memoryNote: "n/a (baseline)",
		skip:       tunUsable(),
		setup: func(ctx context.Context, p *path) error {
			pre, sp, err := e.nsSetup(p, "tunrelayservers")
			if err != nil {
				return err
			}
			srvIP, err := nsServerIP()
			if err != nil {
				return err
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			p.echo = netip.AddrPortFrom(tunRelayAddr, uint16(sp.echoPort)).String()
			p.sink = netip.AddrPortFrom(tunRelayAddr, uint16(sp.sinkPort)).String()
			c, err := e.kids.start(fmt.Sprintf("tunrelay-%d", e.rep), e.dir, slices.Concat(pre, []string{exe, "-tunrelay",
				p.echo + "=" + netip.AddrPortFrom(srvIP, uint16(sp.echoPort)).String(),
				p.sink + "=" + netip.AddrPortFrom(srvIP, uint16(sp.sinkPort)).String()})...)
			if err != nil {
				return err
			}
			p.procs = append(p.procs, c)
			return e.waitReady(ctx, p)
		},
	}
}

// nsSetup makes a network namespace for p's repetition (deleted at p's
// teardown), points p's load generator and admin client into it, and
// starts the bench's servers in it on the netstack paths' server IP. It
// returns the argv prefix that runs a command in the namespace.
func (e *env) nsSetup(p *path, servers string) ([]string, *serverProc, error) {
	n, err := e.newNetns(p, "tun")
	if err != nil {
		return nil, nil, err
	}
	p.dial = n.dial.dial
	p.adminClient = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return n.dial.dial(ctx, addr)
	}}}
	srvIP, err := nsServerIP()
	if err != nil {
		return nil, nil, err
	}
	sp, err := startServersWith(e.kids, e.dir, fmt.Sprintf("%s-%d", servers, e.rep), n.pre(), []netip.Addr{srvIP})
	if err != nil {
		return nil, nil, err
	}
	p.cpuProcs = append(p.cpuProcs, sp.child)
	return n.pre(), sp, nil
}

// tunRelayMain is the tun relay process: for each LISTEN=TARGET argument
// its gVisor stack on a new TUN device listens on LISTEN (a synthetic
// address), and it copies each connection, both ways, to a new kernel
// connection to TARGET, as relayMain does. It runs until killed.
func tunRelayMain(args []string) {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: bench -tunrelay LISTEN=TARGET...")
		os.Exit(2)
	}
	raiseFileLimit(0)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	network, err := netstack.NewTUN(netstack.Options{Logger: log}, tun.Config{Name: "tpbench1", Logger: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunrelay:", err)
		os.Exit(1)
	}
	for _, a := range args {
		listen, target, ok := strings.Cut(a, "=")
		ap, err := netip.ParseAddrPort(listen)
		if !ok || err != nil {
			fmt.Fprintf(os.Stderr, "tunrelay: %q is not LISTEN=TARGET\n", a)
			os.Exit(2)
		}
		ln, err := network.Listen(context.Background(), ap)
		if err != nil {
			fmt.Fprintln(os.Stderr, "tunrelay:", err)
			os.Exit(1)
		}
		go relayServe(netconn.NetListener(ln), func() (halfCloser, error) {
			c, err := net.Dial("tcp4", target)
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		}, nil)
	}
	select {}
}

// nsDialer dials from inside a network namespace: a few goroutines, each
// locked to an OS thread that has joined the namespace, create the sockets
// (a socket belongs to the namespace it was created in, whichever thread
// uses it afterwards).
type nsDialer struct {
	reqs chan nsDial
}

type nsDial struct {
	ctx  context.Context
	addr string
	res  chan nsDialResult
}

type nsDialResult struct {
	c   conn
	err error
}

const nsDialWorkers = 8

func newNSDialer(name string) (*nsDialer, error) {
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d := &nsDialer{reqs: make(chan nsDial)}
	started := make(chan error, nsDialWorkers)
	for range nsDialWorkers {
		nsFD, err := unix.Dup(int(f.Fd()))
		if err != nil {
			close(d.reqs)
			return nil, err
		}
		go d.worker(nsFD, started)
	}
	var errs []error
	for range nsDialWorkers {
		errs = append(errs, <-started)
	}
	if err := errors.Join(errs...); err != nil {
		close(d.reqs)
		return nil, fmt.Errorf("join namespace %s: %w", name, err)
	}
	return d, nil
}

// worker joins the namespace on its own thread and never leaves it: the
// thread ends with the goroutine (it stays locked), so no other goroutine
// ever runs in the namespace by accident.
func (d *nsDialer) worker(nsFD int, started chan<- error) {
	runtime.LockOSThread()
	err := unix.Setns(nsFD, unix.CLONE_NEWNET)
	unix.Close(nsFD)
	started <- err
	if err != nil {
		return
	}
	for r := range d.reqs {
		c, err := kernelDial(r.ctx, r.addr)
		r.res <- nsDialResult{c, err}
	}
}

func (d *nsDialer) dial(ctx context.Context, addr string) (conn, error) {
	res := make(chan nsDialResult, 1)
	select {
	case d.reqs <- nsDial{ctx, addr, res}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	r := <-res
	return r.c, r.err
}

func (d *nsDialer) close() { close(d.reqs) }
