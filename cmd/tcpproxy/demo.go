package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// The demo mesh: a web client with a request channel to three KV servers
// (reply channel), and three peers on a duplex channel. Every instance
// has its own proxy on the loopback network, with its own address ranges
// (127.20.0.0/16 and up) so that they can share this host, and the proxies
// talk over real multiplexed sessions on 127.0.0.1.
const (
	kvPort     = 6379
	gossipPort = 7946
)

type demo struct {
	network string // loopback or memory
	out     io.Writer
	log     *slog.Logger
	members *membership.Dynamic

	mu        sync.Mutex
	nodes     []*demoNode
	published []channels.Member
}

type demoNode struct {
	iid    string
	in     *instance
	events []proxy.Event
	evMu   sync.Mutex
	evDone chan struct{}
	ln     net.Listener // the legacy server, if any
	// host is where the node's legacy programs open sockets: the kernel,
	// or the peer gVisor stack of a memory network.
	host    legacyHost
	network proxy.Network
}

// legacyHost opens the legacy programs' sockets.
type legacyHost interface {
	Listen(ctx context.Context, addr netip.AddrPort) (net.Listener, error)
	Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
}

// kernel is the host's own TCP stack as a legacyHost.
type kernel struct{}

func (kernel) Listen(ctx context.Context, addr netip.AddrPort) (net.Listener, error) {
	var lc net.ListenConfig
	return lc.Listen(ctx, "tcp4", addr.String())
}

func (kernel) Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp4", addr.String())
}

func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	verbose := fs.Bool("v", false, "log the proxies' activity to stderr")
	network := fs.String("network", "loopback", "where legacy sockets live: loopback (host sockets) or memory (a gVisor stack per instance)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *network != "loopback" && *network != "memory" {
		return usageError{fmt.Errorf("-network %q: want loopback or memory", *network)}
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	d := &demo{network: *network, out: stdout, log: newLogger(stderr, "text", level), members: membership.NewDynamic()}
	defer d.stopAll()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return d.run(ctx)
}

func (d *demo) printf(format string, args ...any) { fmt.Fprintf(d.out, format, args...) }

func (d *demo) run(ctx context.Context) error {
	start := time.Now()
	if d.network == "memory" {
		d.printf("tcpproxy demo: 7 proxies in one process, each with its own gVisor TCP/IP stack (memory network), mux sessions on 127.0.0.1\n")
		d.printf("(legacy programs run on a second gVisor stack per instance, so all use the default 127.0.0.0/16)\n\n")
	} else {
		d.printf("tcpproxy demo: 7 proxies in one process, legacy sockets on loopback, mux sessions on 127.0.0.1\n")
		d.printf("(each instance sees the mesh through its own 127.X.0.0/16 so that all seven share this host;\n")
		d.printf(" in a deployment each instance has its own network namespace and the default 127.0.0.0/16)\n\n")
	}
	for i := range 3 {
		iid := fmt.Sprintf("kv-%d", i)
		n, err := d.add(ctx, iid, "kv", map[string]proxy.ChannelConfig{"kv": {Kind: proxy.KindReply, Port: kvPort}})
		if err != nil {
			return err
		}
		if err := n.serve(kvPort, kvServer(iid)); err != nil {
			return err
		}
	}
	web, err := d.add(ctx, "web-0", "web", map[string]proxy.ChannelConfig{"kv": {Kind: proxy.KindRequest, Port: kvPort}})
	if err != nil {
		return err
	}
	var peers []*demoNode
	for _, iid := range []string{"peer-a", "peer-b", "peer-c"} {
		n, err := d.add(ctx, iid, "peer", map[string]proxy.ChannelConfig{"gossip": {Kind: proxy.KindDuplex, Port: gossipPort}})
		if err != nil {
			return err
		}
		if err := n.serve(gossipPort, helloServer(iid)); err != nil {
			return err
		}
		peers = append(peers, n)
	}

	// 1. Request → reply, balanced.
	kvAddr, _ := web.in.proxy.RequestAddr("kv")
	d.printf("1. web-0's legacy client talks to its request channel at %s; each connection goes to one kv instance (round-robin)\n", kvAddr)
	counts := map[string]int{}
	for i := range 9 {
		reply, err := kvSession(ctx, web.host, kvAddr, fmt.Sprintf("SET user:%d alice-%d", i, i), fmt.Sprintf("GET user:%d", i))
		if err != nil {
			return fmt.Errorf("kv request %d: %w", i, err)
		}
		d.printf("   conn %d: %s\n", i+1, reply)
		counts[strings.Fields(reply)[0]]++
	}
	d.printf("   distribution: kv-0=%d kv-1=%d kv-2=%d\n\n", counts["kv-0"], counts["kv-1"], counts["kv-2"])
	if counts["kv-0"] != 3 || counts["kv-1"] != 3 || counts["kv-2"] != 3 {
		return fmt.Errorf("unbalanced distribution %v", counts)
	}

	// 2. Duplex: everybody reaches everybody, and sees who calls.
	d.printf("2. duplex channel gossip: each peer's legacy client calls the others at their instance IPs (impostors)\n")
	for _, from := range peers {
		for _, to := range peers {
			if from == to {
				continue
			}
			ip, err := from.in.proxy.InstanceIP(to.iid)
			if err != nil {
				return err
			}
			target := netip.AddrPortFrom(ip, gossipPort)
			reply, err := ask(ctx, from.host, target, "hello\n")
			if err != nil {
				return fmt.Errorf("%s → %s: %w", from.iid, to.iid, err)
			}
			d.printf("   %s → %-21s %s\n", from.iid, target.String()+":", reply)
		}
	}
	d.printf("\n")

	// 3. Membership change: peer-c leaves.
	d.printf("3. peer-c leaves the membership; peer-a's proxy closes its impostor and reports the change\n")
	seen := peers[0].eventCount()
	d.leave("peer-c")
	change, err := peers[0].waitChange(ctx, "gossip", seen)
	if err != nil {
		return err
	}
	d.printf("   peer-a change event: members %s\n", formatMembers(change.Members))
	cIP, _ := peers[0].in.proxy.InstanceIP("peer-c")
	if _, err := ask(ctx, peers[0].host, netip.AddrPortFrom(cIP, gossipPort), "hello\n"); err != nil {
		d.printf("   peer-a → peer-c now fails as expected: %v\n\n", errors.Unwrap(err))
	} else {
		return errors.New("impostor for peer-c still open after it left")
	}

	// 4. Shutdown and the numbers.
	stats := web.in.proxy.Stats()
	peerStats := peers[0].in.proxy.Stats()
	d.stopAll()
	d.printf("4. shutdown: every proxy drained and sent Close\n")
	tw := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "   instance\tchannel\tkind\tconnections\tfailed\tbytes out\tbytes in\tevents")
	for _, st := range append(stats, peerStats...) {
		owner := "web-0"
		if st.Kind == proxy.KindDuplex {
			owner = "peer-a"
		}
		fmt.Fprintf(tw, "   %s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", owner, st.Channel, st.Kind, st.Connections, st.Failed, st.BytesOut, st.BytesIn, d.node(owner).eventSummary())
	}
	tw.Flush()
	d.printf("\ndemo finished in %s: requests balanced, duplex peers saw their callers' instance IPs, membership tracked, clean shutdown.\n", time.Since(start).Round(time.Millisecond))
	return nil
}

func demoAddressing(i int) proxy.Addressing {
	return proxy.Addressing{
		InstanceRange: netip.MustParsePrefix(fmt.Sprintf("127.%d.0.0/16", 20+2*i)),
		RequestRange:  netip.MustParsePrefix(fmt.Sprintf("127.%d.0.0/16", 21+2*i)),
	}
}

// add starts one instance and publishes it in the membership.
func (d *demo) add(ctx context.Context, iid, role string, chans map[string]proxy.ChannelConfig) (*demoNode, error) {
	d.mu.Lock()
	i := len(d.nodes)
	d.mu.Unlock()
	cfg := &fileConfig{IID: iid, Role: role, Listen: "127.0.0.1:0", Channels: chans}
	var (
		network proxy.Network
		host    legacyHost
	)
	if d.network == "memory" {
		mem, h, err := netstack.NewMemory(netstack.Options{Logger: d.log})
		if err != nil {
			return nil, fmt.Errorf("memory network for %s: %w", iid, err)
		}
		network, host = mem, h
	} else {
		a := demoAddressing(i)
		cfg.Addressing = addressingConfig{InstanceRange: a.InstanceRange.String(), RequestRange: a.RequestRange.String()}
		network, host = proxy.NewLoopback(), kernel{}
	}
	in, err := startInstanceWith(ctx, cfg, network, d.members, d.log, nil)
	if err != nil {
		network.Close()
		return nil, fmt.Errorf("start %s: %w", iid, err)
	}
	n := &demoNode{iid: iid, in: in, evDone: make(chan struct{}), host: host, network: network}
	go func() {
		defer close(n.evDone)
		for e := range in.proxy.Events() {
			n.evMu.Lock()
			n.events = append(n.events, e)
			n.evMu.Unlock()
		}
	}()
	m := in.proxy.Self()
	d.mu.Lock()
	d.nodes = append(d.nodes, n)
	d.published = append(d.published, m)
	d.members.Set(append([]channels.Member(nil), d.published...)...)
	d.mu.Unlock()
	return n, nil
}

func (d *demo) leave(iid string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var keep []channels.Member
	for _, m := range d.published {
		if m.IID != iid {
			keep = append(keep, m)
		}
	}
	d.published = keep
	d.members.Set(append([]channels.Member(nil), keep...)...)
}

func (d *demo) node(iid string) *demoNode {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range d.nodes {
		if n.iid == iid {
			return n
		}
	}
	return nil
}

// stopAll shuts every instance down (idempotent).
func (d *demo) stopAll() {
	d.mu.Lock()
	nodes := d.nodes
	d.mu.Unlock()
	for _, n := range nodes {
		if n.in == nil {
			continue
		}
		if err := n.in.stop(5 * time.Second); err != nil {
			d.log.Warn("stop", "iid", n.iid, "err", err)
		}
		<-n.evDone
		if n.ln != nil {
			n.ln.Close()
		}
		if c, ok := n.host.(io.Closer); ok {
			c.Close()
		}
		n.network.Close()
		n.in = nil
	}
}

// serve runs a legacy server on the node's bind IP.
func (n *demoNode) serve(port uint16, handle func(net.Conn)) error {
	ln, err := n.host.Listen(context.Background(), netip.AddrPortFrom(n.in.proxy.BindIP(), port))
	if err != nil {
		return err
	}
	n.ln = ln
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return nil
}

func (n *demoNode) eventCount() int {
	n.evMu.Lock()
	defer n.evMu.Unlock()
	return len(n.events)
}

// waitChange waits for a Change of channel among the events after the
// first skip ones.
func (n *demoNode) waitChange(ctx context.Context, channel string, skip int) (proxy.Change, error) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		n.evMu.Lock()
		for i := skip; i < len(n.events); i++ {
			if c, ok := n.events[i].(proxy.Change); ok && c.Channel == channel {
				n.evMu.Unlock()
				return c, nil
			}
		}
		n.evMu.Unlock()
		select {
		case <-ctx.Done():
			return proxy.Change{}, fmt.Errorf("waiting for %s change: %w", channel, ctx.Err())
		case <-tick.C:
		}
	}
}

func (n *demoNode) eventSummary() string {
	n.evMu.Lock()
	defer n.evMu.Unlock()
	var parts []string
	for _, e := range n.events {
		switch e := e.(type) {
		case proxy.Ready:
			parts = append(parts, "ready")
		case proxy.Change:
			if e.Kind == proxy.KindRequest {
				parts = append(parts, fmt.Sprintf("change(listening=%v)", e.Listening))
			} else {
				parts = append(parts, fmt.Sprintf("change(%d members)", len(e.Members)))
			}
		case proxy.Synced:
			parts = append(parts, "synced")
		case proxy.Error:
			parts = append(parts, "error")
		case proxy.Closed:
			parts = append(parts, "close")
		}
	}
	return strings.Join(parts, " → ")
}

// kvServer is a tiny line-protocol key-value store: SET k v / GET k.
func kvServer(iid string) func(net.Conn) {
	var mu sync.Mutex
	store := map[string]string{}
	return func(c net.Conn) {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			mu.Lock()
			switch {
			case len(f) == 3 && f[0] == "SET":
				store[f[1]] = f[2]
				fmt.Fprintf(c, "%s OK\n", iid)
			case len(f) == 2 && f[0] == "GET":
				fmt.Fprintf(c, "%s %s=%s (caller %s)\n", iid, f[1], store[f[1]], c.RemoteAddr().(*net.TCPAddr).IP)
			default:
				fmt.Fprintf(c, "%s ERR\n", iid)
			}
			mu.Unlock()
		}
	}
}

// helloServer greets each caller with the address it sees.
func helloServer(iid string) func(net.Conn) {
	return func(c net.Conn) {
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			return
		}
		fmt.Fprintf(c, "%s says: hello %s\n", iid, c.RemoteAddr().(*net.TCPAddr).IP)
	}
}

// kvSession sends the commands on one connection and returns the last answer.
func kvSession(ctx context.Context, host legacyHost, addr netip.AddrPort, cmds ...string) (string, error) {
	c, err := host.Dial(ctx, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	var last string
	for _, cmd := range cmds {
		if _, err := fmt.Fprintln(c, cmd); err != nil {
			return "", err
		}
		if last, err = r.ReadString('\n'); err != nil {
			return "", err
		}
	}
	return strings.TrimSpace(last), nil
}

// ask sends msg and returns the one-line answer.
func ask(ctx context.Context, host legacyHost, addr netip.AddrPort, msg string) (string, error) {
	c, err := host.Dial(ctx, addr)
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}
