// Package tuntest helps tests that need a TUN device: it runs code in a
// fresh network namespace of their own, so that the routing changes of
// package tun never reach the machine's namespace.
package tuntest

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Skip skips t unless the process can create TUN devices and network
// namespaces: root with /dev/net/tun.
func Skip(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("skipping: TUN tests need Linux")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping: TUN tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create a network namespace and a TUN device")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("skipping: TUN tests need /dev/net/tun: %v", err)
	}
}

// NS is a new network namespace, entered by one dedicated OS thread that
// runs the functions given to Do. A socket belongs to the namespace of the
// thread that creates it, so sockets, TUN devices and netlink handles meant
// for the namespace must be made inside Do; once made they work from any
// goroutine.
type NS struct {
	fns    chan func()
	exited chan struct{}
}

// New creates a namespace with lo up, skipping t (see Skip) if that is not
// possible. It is torn down when t ends.
func New(t testing.TB) *NS {
	t.Helper()
	Skip(t)
	ns := &NS{fns: make(chan func()), exited: make(chan struct{})}
	ready := make(chan error, 1)
	go ns.run(ready)
	if err := <-ready; err != nil {
		<-ns.exited
		if errors.Is(err, unix.EPERM) {
			t.Skipf("skipping: cannot create a network namespace: %v", err)
		}
		t.Fatalf("network namespace: %v", err)
	}
	t.Cleanup(ns.close)
	return ns
}

func (ns *NS) run(ready chan<- error) {
	defer close(ns.exited)
	// Never unlocked: the thread leaves the process's namespace, so when
	// this goroutine returns the runtime must destroy the thread rather
	// than give it to other goroutines.
	runtime.LockOSThread()
	if err := unshareNet(); err != nil {
		ready <- err
		return
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		ready <- fmt.Errorf("set lo up: %w", err)
		return
	}
	ready <- nil
	for f := range ns.fns {
		f()
	}
}

// Do runs f on the namespace's thread and returns when f does. f must not
// call t.FailNow (require) or runtime.Goexit: that would end the thread.
// Hand errors out instead.
func (ns *NS) Do(f func()) {
	done := make(chan struct{})
	ns.fns <- func() {
		defer close(done)
		f()
	}
	<-done
}

// close ends the thread, which frees the namespace once nothing else
// (sockets, devices) holds it.
func (ns *NS) close() {
	close(ns.fns)
	<-ns.exited
}
