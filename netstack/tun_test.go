package netstack_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/tun"
	"github.com/tcpproxy/tcpproxy/tun/tuntest"
)

// quiet discards the device's Info logs, which would interleave with
// benchmark results.
var quiet = slog.New(slog.DiscardHandler)

// newTUN makes a Network on a TUN device in a fresh network namespace, with
// bindIP kept on the host. Strict reverse-path filtering is on, as on many
// distributions, to show that the routing satisfies it.
func newTUN(t testing.TB) (*netstack.Network, *tuntest.NS) {
	t.Helper()
	return newTUNWithMTU(t, 0)
}

func newTUNWithMTU(t testing.TB, mtu int) (*netstack.Network, *tuntest.NS) {
	t.Helper()
	ns := tuntest.New(t)
	var n *netstack.Network
	var err error
	ns.Do(func() {
		for _, key := range []string{"all", "default"} {
			if err = os.WriteFile("/proc/sys/net/ipv4/conf/"+key+"/rp_filter", []byte("1"), 0); err != nil {
				return
			}
		}
		n, err = netstack.NewTUN(netstack.Options{Logger: quiet}, tun.Config{Name: "tptest0", MTU: mtu, Local: []netip.Addr{bindIP}})
	})
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, n.Close()) })
	return n, ns
}

// kernelDial connects an ordinary kernel socket of the namespace to dst.
func kernelDial(ns *tuntest.NS, dst netip.AddrPort) (c net.Conn, err error) {
	ns.Do(func() { c, err = net.Dial("tcp", dst.String()) })
	return c, err
}

// kernelListen listens with an ordinary kernel socket of the namespace.
func kernelListen(ns *tuntest.NS, addr netip.AddrPort) (l net.Listener, err error) {
	ns.Do(func() { l, err = net.Listen("tcp", addr.String()) })
	return l, err
}

func TestTUNKernelReachesClaimedAddress(t *testing.T) {
	// 65000: the default; 1500: the kernel's TSO bursts are split into
	// many packets per read.
	for _, mtu := range []int{0, 1500} {
		t.Run(fmt.Sprintf("mtu=%d", mtu), func(t *testing.T) { testTUNKernelReachesClaimedAddress(t, mtu) })
	}
}

func testTUNKernelReachesClaimedAddress(t *testing.T, mtu int) {
	ctx := testCtx(t)
	n, ns := newTUNWithMTU(t, mtu)
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := n.Listen(ctx, claim)
	require.NoError(t, err)
	defer l.Close()

	client, server := pair(t, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
	assert.Equal(t, claim, addrPort(t, server.LocalAddr()))
	assert.Equal(t, hostIP, addrPort(t, server.RemoteAddr()).Addr(), "the kernel's source is the route's src")
	assert.Equal(t, addrPort(t, client.LocalAddr()), addrPort(t, server.RemoteAddr()))

	want := make([]byte, 1<<20)
	_, _ = rand.Read(want)
	echoed := make(chan error, 1)
	go func() {
		_, err := io.Copy(server, server)
		if err == nil {
			err = server.(halfCloser).CloseWrite()
		}
		echoed <- err
	}()
	wrote := make(chan error, 1)
	go func() {
		_, err := client.Write(want)
		if err == nil {
			err = client.(*net.TCPConn).CloseWrite()
		}
		wrote <- err
	}()
	got, err := io.ReadAll(client)
	require.NoError(t, err)
	require.NoError(t, <-wrote)
	require.NoError(t, <-echoed)
	require.True(t, bytes.Equal(want, got), "echo differs: got %d bytes, want %d", len(got), len(want))

	_, err = kernelDial(ns, netip.AddrPortFrom(requestIP, 81))
	require.ErrorIs(t, err, syscall.ECONNREFUSED, "an unclaimed port is refused")
}

func TestTUNDialFromSpoofedSourceReachesKernel(t *testing.T) {
	ctx := testCtx(t)
	n, ns := newTUN(t)
	server := netip.AddrPortFrom(bindIP, 6379)
	l, err := kernelListen(ns, server)
	require.NoError(t, err)
	defer l.Close()

	dialed, accepted := pair(t, l, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
	assert.Equal(t, peerIP, addrPort(t, accepted.RemoteAddr()).Addr(), "the legacy server must see the peer's instance IP")
	assert.Equal(t, addrPort(t, dialed.LocalAddr()), addrPort(t, accepted.RemoteAddr()))
	roundTrip(t, dialed, accepted)
	roundTrip(t, accepted, dialed)

	// Half-close towards the kernel; the reverse direction still flows.
	require.NoError(t, dialed.(halfCloser).CloseWrite())
	rest, err := io.ReadAll(accepted)
	require.NoError(t, err)
	require.Empty(t, rest)
	roundTrip(t, accepted, dialed)
	require.NoError(t, accepted.(*net.TCPConn).CloseWrite())
	rest, err = io.ReadAll(dialed)
	require.NoError(t, err)
	require.Empty(t, rest)

	// SetLinger(0) + Close resets the kernel's connection.
	dialed, accepted = pair(t, l, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
	roundTrip(t, dialed, accepted)
	require.NoError(t, dialed.(halfCloser).SetLinger(0))
	require.NoError(t, dialed.Close())
	_, err = accepted.Read(make([]byte, 1))
	require.ErrorIs(t, err, syscall.ECONNRESET)

	_, err = n.Dial(ctx, peerIP, netip.AddrPortFrom(bindIP, 1))
	require.ErrorIs(t, err, syscall.ECONNREFUSED, "the kernel refuses a closed port")
}

// BenchmarkTUNThroughput is bulk transfer from a kernel socket to a
// Network listener through the TUN device (compare
// BenchmarkDirectTCPThroughput).
func BenchmarkTUNThroughput(b *testing.B) {
	n, ns := newTUN(b)
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := n.Listen(context.Background(), claim)
	require.NoError(b, err)
	defer l.Close()
	client, server := pair(b, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
	benchThroughput(b, client, server)
}

// BenchmarkTUNThroughputDial is bulk transfer from a Network Dial (spoofed
// source) to a kernel listener through the TUN device.
func BenchmarkTUNThroughputDial(b *testing.B) {
	n, ns := newTUN(b)
	server := netip.AddrPortFrom(bindIP, 6379)
	l, err := kernelListen(ns, server)
	require.NoError(b, err)
	defer l.Close()
	client, accepted := pair(b, l, func() (net.Conn, error) { return n.Dial(context.Background(), peerIP, server) })
	benchThroughput(b, client, accepted)
}

// BenchmarkTUNConnect is connection setup from a kernel socket to a
// Network listener through the TUN device.
func BenchmarkTUNConnect(b *testing.B) {
	n, ns := newTUN(b)
	claim := netip.AddrPortFrom(requestIP, 6379)
	l, err := n.Listen(context.Background(), claim)
	require.NoError(b, err)
	benchConnect(b, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
}
