package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Hosts. Every namespace path runs in network namespaces that the bench
// makes for one repetition of one path and deletes after it (and at exit,
// also after an error or Ctrl-C). Their names carry the bench's pid, so a
// later run deletes what a killed run (SIGKILL, a crash) left behind: see
// sweepNamespaces. Nothing is created in the bench's own namespace: a veth
// pair is made inside one host and its peer moved straight into the other.

// nsPrefix starts the name of every namespace the bench makes.
const nsPrefix = "tp-bench-"

// The cross-host network: host A (load generator, client proxy) and host B
// (server proxy, the bench's servers) joined by a veth pair with the
// kernel's defaults (MTU 1500, TSO and GRO on), as two machines on one
// link. The addresses exist only inside the two namespaces.
var (
	hostAAddr  = netip.MustParseAddr("10.217.0.1")
	hostBAddr  = netip.MustParseAddr("10.217.0.2")
	hostPrefix = 24
)

// netns is a network namespace made by the bench.
type netns struct {
	name string
	dial *nsDialer // sockets made inside it, for the load generator
	once sync.Once // deletes it
}

// pre is the argv prefix that runs a command inside the namespace; `ip
// netns exec` execs the command in place, so its pid is the command's.
func (n *netns) pre() []string { return []string{"ip", "netns", "exec", n.name} }

// ip runs `ip -n NAME args...`.
func (n *netns) ip(args ...string) error { return ipCmd(append([]string{"-n", n.name}, args...)...) }

func ipCmd(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// newNetns makes a namespace with lo up for p's repetition; p's teardown
// (or the bench's exit) deletes it, killing whatever still runs in it.
func (e *env) newNetns(p *path, role string) (*netns, error) {
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	n := &netns{name: fmt.Sprintf("%s%d-%s-%s", nsPrefix, os.Getpid(), hex.EncodeToString(rnd[:]), role)}
	if err := ipCmd("netns", "add", n.name); err != nil {
		return nil, err
	}
	del := func() {
		n.once.Do(func() {
			if n.dial != nil {
				n.dial.close()
			}
			deleteNetns(n.name)
		})
	}
	e.kids.atExit(del)
	p.addCleanup(del)
	if err := n.ip("link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	var err error
	if n.dial, err = newNSDialer(n.name); err != nil {
		return nil, err
	}
	return n, nil
}

// deleteNetns kills the processes left in namespace name and deletes it;
// deleting one that is gone already is a no-op.
func deleteNetns(name string) {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	_ = exec.Command("ip", "netns", "del", name).Run()
}

// sweepNamespaces deletes the namespaces of bench runs that are no longer
// running (killed before they could clean up).
func sweepNamespaces() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(f[0], nsPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil {
			continue // not named by this version of the bench
		}
		if pid != os.Getpid() && syscall.Kill(pid, 0) == syscall.ESRCH {
			log.Printf("deleting namespace %s of an earlier run (pid %d) that did not clean up", f[0], pid)
			deleteNetns(f[0])
		}
	}
}

// hostPair is the two hosts of a cross-host path.
type hostPair struct {
	a, b *netns
}

// newHostPair makes hosts A and B for p's repetition, joined by a veth
// pair, points p's load generator at A and its admin client at both (by
// port: adminA and adminB are the admin ports of the proxies in A and B),
// and starts the bench's servers in B on 127.0.0.1, B's address and
// extra.
func (e *env) newHostPair(p *path, adminA, adminB int, extra ...netip.Addr) (*hostPair, *serverProc, error) {
	a, err := e.newNetns(p, "a")
	if err != nil {
		return nil, nil, err
	}
	b, err := e.newNetns(p, "b")
	if err != nil {
		return nil, nil, err
	}
	// Made in A, the peer moved straight into B.
	if err := a.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.name); err != nil {
		return nil, nil, err
	}
	for _, h := range []struct {
		ns   *netns
		addr netip.Addr
	}{{a, hostAAddr}, {b, hostBAddr}} {
		if err := h.ns.ip("addr", "add", fmt.Sprintf("%s/%d", h.addr, hostPrefix), "dev", "eth0"); err != nil {
			return nil, nil, err
		}
		if err := h.ns.ip("link", "set", "eth0", "up"); err != nil {
			return nil, nil, err
		}
	}
	p.dial = a.dial.dial
	p.adminClient = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		if _, port, _ := net.SplitHostPort(addr); port == strconv.Itoa(adminB) {
			return b.dial.dial(ctx, addr)
		}
		return a.dial.dial(ctx, addr)
	}}}
	ips := append([]netip.Addr{netip.MustParseAddr("127.0.0.1"), hostBAddr}, extra...)
	sp, err := startServersWith(e.kids, e.dir, fmt.Sprintf("%s-servers-%d", p.key, e.rep), b.pre(), ips)
	if err != nil {
		return nil, nil, err
	}
	p.cpuProcs = append(p.cpuProcs, sp.child)
	return &hostPair{a: a, b: b}, sp, nil
}
