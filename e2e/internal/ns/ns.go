//go:build linux

// Package ns creates and drives Linux network namespaces for the
// multi-host tests: namespaces, veth pairs, a bridge, link faults, and
// sockets opened inside a namespace from the test process itself.
//
// Nothing here touches the root namespace's interfaces, routes or rules:
// every link is created inside a test namespace (ip -n NS link add ...
// peer ... netns OTHER), and every address exists only there.
package ns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// cmdTimeout bounds every ip/tc/sysctl command.
const cmdTimeout = 20 * time.Second

var (
	checkOnce sync.Once
	checkErr  error
)

// Check reports why namespaces cannot be used here (not root, no ip
// binary, no /var/run/netns support), or nil. It probes once per process.
func Check() error {
	checkOnce.Do(func() { checkErr = check() })
	return checkErr
}

func check() error {
	if os.Geteuid() != 0 {
		return errors.New("not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("the ip command (iproute2) is not installed: %w", err)
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		return fmt.Errorf("no network namespace support: %w", err)
	}
	// A probe namespace proves that ip netns works (a container without
	// CAP_SYS_ADMIN fails here).
	name := fmt.Sprintf("tp-probe-%d", os.Getpid())
	if out, err := run(context.Background(), "ip", "netns", "add", name); err != nil {
		return fmt.Errorf("ip netns add: %v: %s", err, out)
	}
	if out, err := run(context.Background(), "ip", "netns", "del", name); err != nil {
		return fmt.Errorf("ip netns del: %v: %s", err, out)
	}
	return nil
}

// run runs a command with cmdTimeout and returns its combined output.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out.Bytes()))
	}
	return out.Bytes(), nil
}

// Namespace is a named network namespace (ip netns) made by Create.
type Namespace struct {
	Name string

	mu     sync.Mutex
	fd     int // open /var/run/netns/Name, -1 once closed
	closed bool
}

// Create makes the named namespace and brings its lo up.
func Create(name string) (*Namespace, error) {
	if len(name) > 64 {
		return nil, fmt.Errorf("namespace name %q is too long", name)
	}
	if _, err := run(context.Background(), "ip", "netns", "add", name); err != nil {
		return nil, err
	}
	fd, err := unix.Open(filepath.Join("/var/run/netns", name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		_, _ = run(context.Background(), "ip", "netns", "del", name)
		return nil, fmt.Errorf("open namespace %s: %w", name, err)
	}
	n := &Namespace{Name: name, fd: fd}
	if err := n.IP("link", "set", "lo", "up"); err != nil {
		_ = n.Delete()
		return nil, err
	}
	return n, nil
}

// Delete kills every process still in the namespace and removes it,
// which also destroys its interfaces (and the veth peers elsewhere).
func (n *Namespace) Delete() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	fd := n.fd
	n.fd = -1
	n.mu.Unlock()
	_ = unix.Close(fd)
	KillAll(n.Name)
	_, err := run(context.Background(), "ip", "netns", "del", n.Name)
	return err
}

// KillAll sends SIGKILL to every process in namespace name (ip netns pids).
func KillAll(name string) {
	out, err := run(context.Background(), "ip", "netns", "pids", name)
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil && pid > 1 && pid != os.Getpid() {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// IP runs `ip -n NAME args...`.
func (n *Namespace) IP(args ...string) error {
	_, err := run(context.Background(), "ip", append([]string{"-n", n.Name}, args...)...)
	return err
}

// Exec runs a command inside the namespace (ip netns exec) and returns its
// combined output.
func (n *Namespace) Exec(name string, args ...string) ([]byte, error) {
	return run(context.Background(), "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Command returns an unstarted command that runs inside the namespace.
// It is killed (SIGKILL) if the test process dies.
func (n *Namespace) Command(name string, args ...string) *exec.Cmd {
	// ip netns exec execs the program in place (no fork), so the pid of
	// the command is the program's own pid.
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.SysProcAttr = &unix.SysProcAttr{Pdeathsig: unix.SIGKILL}
	return cmd
}

// Sysctl sets key (e.g. net.ipv4.ip_forward) to value in the namespace.
func (n *Namespace) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error { return os.WriteFile(path, []byte(value), 0o644) })
}

// Do runs f on an OS thread that has joined the namespace. Sockets (and
// TUN devices) that f creates belong to the namespace for their whole
// life, whatever thread uses them later. f must not start goroutines that
// expect to be in the namespace.
func (n *Namespace) Do(f func() error) error {
	n.mu.Lock()
	fd := n.fd
	n.mu.Unlock()
	if fd < 0 {
		return fmt.Errorf("namespace %s is deleted", n.Name)
	}
	errc := make(chan error, 1)
	go func() {
		// Lock the thread for the whole goroutine: if the namespace cannot
		// be restored, returning without UnlockOSThread makes the runtime
		// discard the thread rather than reuse it in the wrong namespace.
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own namespace: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter namespace %s: %w", n.Name, err)
			return
		}
		ferr := f()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave namespace %s: %w", n.Name, err))
			return // thread stays locked and is discarded
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a TCP listener inside the namespace.
func (n *Namespace) Listen(addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	return ln, err
}

// Dial connects from inside the namespace to addr, within timeout.
func (n *Namespace) Dial(addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = net.DialTimeout("tcp4", addr, timeout)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}
