package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// The cross-host paths: the topology deployments run. Host A holds the
// load generator and the client-side proxy, host B the server-side proxy
// and the bench's servers; every path carries the load generator's
// connections from A to the servers on B:
//
//	direct         A → B's servers over the veth, no proxy
//	relay2         two plain Go relays (io.Copy: splice), one per host: the
//	               floor of any two-proxy design whose proxies talk TCP
//	haproxy        an haproxy on each host, TCP mode
//	haproxy-tls    the same with mutual TLS between them
//	stunnel        a stunnel client on A and server on B (mutual TLS)
//	tcpproxy       tcpproxy request→reply, plaintext sessions
//	tcpproxy-mtls  the same with mutual TLS (`tcpproxy certs`)
//	tcpproxy-tun   the client instance on network: tun
//	tcpproxy-tun2  both instances on network: tun
//
// The TLS anchors use the cipher suite Go negotiates (see tlsSuite), so
// that they do the same cryptographic work as tcpproxy, and mutual TLS
// with certificates from the same CA.

// Fixed ports: every repetition has fresh namespaces.
const (
	xTransportPort = 7000 // tcpproxy sessions, on each host's address
	xAdminA        = 7101 // admin endpoint of the proxy on A
	xAdminB        = 7102 // and on B
	xFrontEcho     = 8001 // A's proxy listens here on 127.0.0.1 ...
	xFrontSink     = 8002
	xMidEcho       = 9001 // ... and B's on its address here
	xMidSink       = 9002
)

// xPath is a cross-host path: setup gets the two hosts and the servers.
func xPath(key, name string, setup func(ctx context.Context, p *path, h *hostPair, sp *serverProc) error, extraIPs ...netip.Addr) func(*env) *path {
	return func(e *env) *path {
		p := &path{key: key, name: name, cross: true, skip: nsUsable(), memoryNote: "n/a"}
		p.setup = func(ctx context.Context, p *path) error {
			h, sp, err := e.newHostPair(p, xAdminA, xAdminB, extraIPs...)
			if err != nil {
				return err
			}
			if err := setup(ctx, p, h, sp); err != nil {
				return err
			}
			return e.waitReady(ctx, p)
		}
		return p
	}
}

func frontAddrs(p *path) {
	p.echo, p.sink = fmt.Sprintf("127.0.0.1:%d", xFrontEcho), fmt.Sprintf("127.0.0.1:%d", xFrontSink)
}

func hostPort(a netip.Addr, port int) string { return netip.AddrPortFrom(a, uint16(port)).String() }

func xDirectPath(e *env) *path {
	return xPath("x-direct", "direct over the veth (no proxy)", func(_ context.Context, p *path, _ *hostPair, sp *serverProc) error {
		p.echo, p.sink = hostPort(hostBAddr, sp.echoPort), hostPort(hostBAddr, sp.sinkPort)
		return nil
	})(e)
}

// xRelayPath is a relay on each host; with tls, mutual TLS between them;
// with copying, through a buffer rather than splicing.
func xRelayPath(tls, copying bool) func(*env) *path {
	key, name := "x-relay2", "two Go relays (io.Copy), the floor"
	switch {
	case tls:
		key, name = "x-relay2-tls", "two Go relays, mutual TLS between them (floor)"
	case copying:
		key, name = "x-relay2-copy", "two Go relays copying through a buffer (floor)"
	}
	return func(e *env) *path {
		p := xPath(key, name, func(_ context.Context, p *path, h *hostPair, sp *serverProc) error {
			var in, out []string
			if copying {
				in, out = []string{"-copy"}, []string{"-copy"}
			}
			if tls {
				c := e.certs
				in = []string{"-tls-in", strings.Join([]string{c.cert("bench-srv"), c.key("bench-srv"), c.ca}, ",")}
				out = []string{"-tls-out", strings.Join([]string{c.cert("bench-cli"), c.key("bench-cli"), c.ca}, ",")}
			}
			if err := e.startRelayIn(p, h.b, "relay-b", in,
				hostPort(hostBAddr, xMidEcho), fmt.Sprintf("127.0.0.1:%d", sp.echoPort),
				hostPort(hostBAddr, xMidSink), fmt.Sprintf("127.0.0.1:%d", sp.sinkPort)); err != nil {
				return err
			}
			if err := e.startRelayIn(p, h.a, "relay-a", out,
				fmt.Sprintf("127.0.0.1:%d", xFrontEcho), hostPort(hostBAddr, xMidEcho),
				fmt.Sprintf("127.0.0.1:%d", xFrontSink), hostPort(hostBAddr, xMidSink)); err != nil {
				return err
			}
			frontAddrs(p)
			return nil
		})(e)
		if tls || copying {
			p.tests = "bulk" // a floor of CPU per byte
		}
		return p
	}
}

// xTUNRelayPath is the floor of a client-side proxy on a TUN device: the
// tun relay (one gVisor stack on a TUN, copying to kernel connections) on
// A, a plain relay on B.
func xTUNRelayPath(e *env) *path {
	p := xPath("x-tunrelay", "gVisor relay on a TUN + Go relay (floor of a TUN client)", func(_ context.Context, p *path, h *hostPair, sp *serverProc) error {
		if err := e.startRelayIn(p, h.b, "relay-b", nil,
			hostPort(hostBAddr, xMidEcho), fmt.Sprintf("127.0.0.1:%d", sp.echoPort),
			hostPort(hostBAddr, xMidSink), fmt.Sprintf("127.0.0.1:%d", sp.sinkPort)); err != nil {
			return err
		}
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		p.echo = netip.AddrPortFrom(tunRelayAddr, xFrontEcho).String()
		p.sink = netip.AddrPortFrom(tunRelayAddr, xFrontSink).String()
		c, err := e.kids.start(fmt.Sprintf("%s-tunrelay-%d", p.key, e.rep), e.dir, append(h.a.pre(), exe, "-tunrelay",
			p.echo+"="+hostPort(hostBAddr, xMidEcho), p.sink+"="+hostPort(hostBAddr, xMidSink))...)
		if err != nil {
			return err
		}
		p.procs = append(p.procs, c)
		return nil
	})(e)
	p.tests = "bulk"
	if p.skip == "" {
		p.skip = tunUsable()
	}
	return p
}

// startRelayIn starts a relay process (this program with -relay and
// flags) in ns, relaying args[0] to args[1], args[2] to args[3]...
func (e *env) startRelayIn(p *path, ns *netns, name string, flags []string, args ...string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	argv := append(append(ns.pre(), exe, "-relay"), flags...)
	for i := 0; i+1 < len(args); i += 2 {
		argv = append(argv, args[i]+"="+args[i+1])
	}
	c, err := e.kids.start(fmt.Sprintf("%s-%s-%d", p.key, name, e.rep), e.dir, argv...)
	if err != nil {
		return err
	}
	p.procs = append(p.procs, c)
	return nil
}

// haproxyPairConfig is an haproxy configuration relaying echo and sink
// from listen addresses to targets; bindTLS and serverTLS are the options
// of the bind and server lines (TLS), empty for plain TCP.
const haproxyPairConfig = `global
    nbthread 2
    maxconn %[8]d
    %[7]s
defaults
    mode tcp
    maxconn %[8]d
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend echo
    bind %[1]s %[5]s
    default_backend echo
backend echo
    server echo %[2]s %[6]s
frontend sink
    bind %[3]s %[5]s
    default_backend sink
backend sink
    server sink %[4]s %[6]s
`

func xHaproxyPath(tls bool) func(*env) *path {
	key, name := "x-haproxy", "haproxy pair, TCP mode"
	if tls {
		key, name = "x-haproxy-tls", "haproxy pair, mutual TLS between them"
	}
	return func(e *env) *path {
		return xPath(key, name, func(_ context.Context, p *path, h *hostPair, sp *serverProc) error {
			var bindOpts, serverOpts, global string
			if tls {
				c := e.certs
				bindOpts = fmt.Sprintf("ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3", c.bundle("bench-srv"), c.ca)
				serverOpts = fmt.Sprintf("ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3", c.bundle("bench-cli"), c.ca)
				global = fmt.Sprintf("ssl-default-bind-ciphersuites %[1]s\n    ssl-default-server-ciphersuites %[1]s", e.suite.openssl)
			}
			// Two descriptors per connection, within the file limit.
			maxconn := min(20000, int(e.fileLimit-1000)/2)
			b := fmt.Sprintf(haproxyPairConfig, hostPort(hostBAddr, xMidEcho), fmt.Sprintf("127.0.0.1:%d", sp.echoPort),
				hostPort(hostBAddr, xMidSink), fmt.Sprintf("127.0.0.1:%d", sp.sinkPort), bindOpts, "", global, maxconn)
			a := fmt.Sprintf(haproxyPairConfig, fmt.Sprintf("127.0.0.1:%d", xFrontEcho), hostPort(hostBAddr, xMidEcho),
				fmt.Sprintf("127.0.0.1:%d", xFrontSink), hostPort(hostBAddr, xMidSink), "", serverOpts, global, maxconn)
			for _, x := range []struct {
				name, cfg string
				ns        *netns
			}{{"haproxy-b", b, h.b}, {"haproxy-a", a, h.a}} {
				if err := e.startConfigured(p, x.ns, x.name, x.cfg, "haproxy", "-db", "-f"); err != nil {
					return err
				}
			}
			frontAddrs(p)
			return nil
		})(e)
	}
}

// startConfigured writes cfg to a file and starts argv with the file's
// name appended, in ns.
func (e *env) startConfigured(p *path, ns *netns, name, cfg string, argv ...string) error {
	file := filepath.Join(e.dir, fmt.Sprintf("%s-%s-%d.cfg", p.key, name, e.rep))
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		return err
	}
	c, err := e.kids.start(fmt.Sprintf("%s-%s-%d", p.key, name, e.rep), e.dir, append(append(ns.pre(), argv...), file)...)
	if err != nil {
		return err
	}
	p.procs = append(p.procs, c)
	return nil
}

// stunnelBinary is the stunnel command, or "" if none is installed.
func stunnelBinary() string {
	for _, b := range []string{"stunnel4", "stunnel"} {
		if p, err := exec.LookPath(b); err == nil {
			return p
		}
	}
	return ""
}

func xStunnelPath(e *env) *path {
	p := xPath("x-stunnel", "stunnel pair (mutual TLS)", func(_ context.Context, p *path, h *hostPair, sp *serverProc) error {
		c := e.certs
		common := func(iid string) string {
			return fmt.Sprintf("foreground = yes\npid =\ndebug = 3\n\ncert = %s\nkey = %s\nCAfile = %s\nverifyChain = yes\nsslVersionMin = TLSv1.3\nciphersuites = %s\n",
				c.cert(iid), c.key(iid), c.ca, e.suite.openssl)
		}
		b := common("bench-srv") + fmt.Sprintf("\n[echo]\naccept = %s\nconnect = 127.0.0.1:%d\n\n[sink]\naccept = %s\nconnect = 127.0.0.1:%d\n",
			hostPort(hostBAddr, xMidEcho), sp.echoPort, hostPort(hostBAddr, xMidSink), sp.sinkPort)
		a := common("bench-cli") + fmt.Sprintf("client = yes\n\n[echo]\naccept = 127.0.0.1:%d\nconnect = %s\n\n[sink]\naccept = 127.0.0.1:%d\nconnect = %s\n",
			xFrontEcho, hostPort(hostBAddr, xMidEcho), xFrontSink, hostPort(hostBAddr, xMidSink))
		bin := stunnelBinary()
		if err := e.startConfigured(p, h.b, "stunnel-b", b, bin); err != nil {
			return err
		}
		if err := e.startConfigured(p, h.a, "stunnel-a", a, bin); err != nil {
			return err
		}
		frontAddrs(p)
		return nil
	})(e)
	if stunnelBinary() == "" {
		p.skip = "stunnel is not installed"
	}
	return p
}

// xTCPProxyPath is tcpproxy request→reply across the hosts: bench-cli on
// A with request channels echo and sink, bench-srv on B replying on them.
// mtls selects mutual TLS sessions; tunA and tunB put the instance on A or
// B on network: tun.
func xTCPProxyPath(key, name string, mtls, tunA, tunB bool) func(*env) *path {
	srvIP, _ := proxy.NewInstanceAllocator(proxy.DefaultInstanceRange).Add("bench-srv")
	return func(e *env) *path {
		p := xPath(key, name, func(_ context.Context, p *path, h *hostPair, sp *serverProc) error {
			reqIPs, err := proxy.RequestIPs(proxy.DefaultRequestRange, []string{"echo", "sink"})
			if err != nil {
				return err
			}
			ep, spt := sp.echoPort, sp.sinkPort
			srv := &tcpproxyInstance{iid: "bench-srv", role: "bench-server", listen: xTransportPort, admin: xAdminB,
				host: hostBAddr, ns: h.b,
				channels:       fmt.Sprintf("  echo: {kind: reply, port: %d}\n  sink: {kind: reply, port: %d}\n", ep, spt),
				servesChannels: fmt.Sprintf("echo: %d, sink: %d", ep, spt)}
			cli := &tcpproxyInstance{iid: "bench-cli", role: "bench-client", listen: xTransportPort, admin: xAdminA,
				host: hostAAddr, ns: h.a,
				channels: fmt.Sprintf("  echo: {kind: request, port: %d}\n  sink: {kind: request, port: %d}\n", ep, spt)}
			for _, in := range []*tcpproxyInstance{srv, cli} {
				if mtls {
					c := e.certs
					in.extra += fmt.Sprintf("tls: {cert: %s, key: %s, ca: %s}\n", c.cert(in.iid), c.key(in.iid), c.ca)
				} else {
					in.transport = insecureTransport
				}
			}
			if tunA {
				cli.extra += "network: tun\ntun: {name: tpbx0}\n"
			}
			if tunB {
				srv.extra += "network: tun\ntun: {name: tpbx0}\n"
			}
			if err := e.startTCPProxies(p, []*tcpproxyInstance{srv, cli}); err != nil {
				return err
			}
			p.echo = netip.AddrPortFrom(reqIPs["echo"], uint16(ep)).String()
			p.sink = netip.AddrPortFrom(reqIPs["sink"], uint16(spt)).String()
			return nil
		}, srvIP)(e)
		if (tunA || tunB) && p.skip == "" {
			p.skip = tunUsable()
		}
		return p
	}
}

// insecureTransport is the transport block of plaintext sessions between
// hosts: tcpproxy refuses them to non-loopback addresses without this
// explicit opt-in.
const insecureTransport = "transport: {insecure: true}\n"

// certFiles are the certificates of the TLS paths, made once per run with
// `tcpproxy certs` for bench-cli and bench-srv.
type certFiles struct {
	dir, ca string
}

func (c *certFiles) cert(iid string) string { return filepath.Join(c.dir, iid+".pem") }
func (c *certFiles) key(iid string) string  { return filepath.Join(c.dir, iid+"-key.pem") }

// bundle is iid's certificate followed by its key, as haproxy takes them.
func (c *certFiles) bundle(iid string) string { return filepath.Join(c.dir, iid+"-bundle.pem") }

func makeCerts(binary, dir string) (*certFiles, error) {
	c := &certFiles{dir: filepath.Join(dir, "certs")}
	c.ca = filepath.Join(c.dir, "ca.pem")
	out, err := exec.Command(binary, "certs", "-dir", c.dir, "bench-cli:bench-client", "bench-srv:bench-server").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("tcpproxy certs: %v: %s", err, out)
	}
	for _, iid := range []string{"bench-cli", "bench-srv"} {
		cert, err := os.ReadFile(c.cert(iid))
		if err != nil {
			return nil, err
		}
		key, err := os.ReadFile(c.key(iid))
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(c.bundle(iid), append(cert, key...), 0o600); err != nil {
			return nil, err
		}
	}
	return c, nil
}
