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
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
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
	// 65000: the default; 1500: the kernel's TSO bursts, which reach the
	// stack whole, and the stack's GSO segments exceed the MTU.
	for _, mtu := range []int{0, 1500} {
		t.Run(fmt.Sprintf("mtu=%d", mtu), func(t *testing.T) { testTUNKernelReachesClaimedAddress(t, mtu) })
	}
}

func testTUNKernelReachesClaimedAddress(t *testing.T, mtu int) {
	ctx := testCtx(t)
	n, ns := newTUNWithMTU(t, mtu)
	claim, l := listenClaim(ctx, t, n)

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
	claim, l := listenClaim(context.Background(), b, n)
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
	l, err := netListen(n.Listen(context.Background(), claim))
	require.NoError(b, err)
	benchConnect(b, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
}

func TestTUNBulkTransferBothWays(t *testing.T) {
	// 65000: every segment fits the MTU; 1500: the kernel's TSO bursts
	// reach the stack whole, and the stack's segments exceed the MTU
	// (GSO) for the kernel to take whole.
	for _, mtu := range []int{0, 1500} {
		t.Run(fmt.Sprintf("mtu=%d", mtu), func(t *testing.T) {
			ctx := testCtx(t)
			n, ns := newTUNWithMTU(t, mtu)
			claim, l := listenClaim(ctx, t, n)
			server := netip.AddrPortFrom(bindIP, 6379)
			kl, err := kernelListen(ns, server)
			require.NoError(t, err)
			defer kl.Close()

			t.Run("kernel dials", func(t *testing.T) {
				client, server := pair(t, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
				exchange(t, client, server)
			})
			t.Run("stack dials", func(t *testing.T) {
				client, server := pair(t, kl, func() (net.Conn, error) { return n.Dial(ctx, peerIP, server) })
				exchange(t, client, server)
			})
		})
	}
}

// exchange sends 4 MiB each way between a and b at the same time, each
// followed by a half-close, and checks that both arrive intact.
func exchange(t *testing.T, a, b net.Conn) {
	t.Helper()
	const size = 4 << 20
	type result struct {
		got []byte
		err error
	}
	transfer := func(from, to net.Conn, data []byte) (<-chan error, <-chan result) {
		sent, received := make(chan error, 1), make(chan result, 1)
		go func() {
			_, err := from.Write(data)
			if err == nil {
				err = from.(halfCloser).CloseWrite()
			}
			sent <- err
		}()
		go func() {
			got, err := io.ReadAll(to)
			received <- result{got, err}
		}()
		return sent, received
	}
	ab, ba := make([]byte, size), make([]byte, size)
	_, _ = rand.Read(ab)
	_, _ = rand.Read(ba)
	sentAB, gotAB := transfer(a, b, ab)
	sentBA, gotBA := transfer(b, a, ba)
	for _, c := range []struct {
		name     string
		sent     <-chan error
		received <-chan result
		want     []byte
	}{{"a to b", sentAB, gotAB, ab}, {"b to a", sentBA, gotBA, ba}} {
		require.NoError(t, <-c.sent, c.name)
		r := <-c.received
		require.NoError(t, r.err, c.name)
		require.True(t, bytes.Equal(c.want, r.got), "%s: got %d bytes that differ from the %d sent", c.name, len(r.got), len(c.want))
	}
}

// TestTUNDropsCorruptPacket sends the stack, through the kernel, a SYN with
// a bad TCP checksum and then the same SYN with a good one. The kernel
// hands packets of raw sockets (and forwarded ones) to the device as they
// are, without VIRTIO_NET_HDR_F_NEEDS_CSUM: the link must verify them,
// since the stack trusts it to. The stack answers one connection's
// segments in order, so its first SYN-ACK acknowledges the good SYN only
// if it never saw the corrupt one.
func TestTUNDropsCorruptPacket(t *testing.T) {
	ctx := testCtx(t)
	n, ns := newTUN(t)
	claim, _ := listenClaim(ctx, t, n) // the stack answers SYNs to a claimed port only

	var send, recv int
	var err error
	ns.Do(func() {
		if send, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return
		}
		recv, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	})
	require.NoError(t, err)
	defer unix.Close(send)
	defer unix.Close(recv)
	// Against a hang if the stack never answers, not for synchronisation.
	require.NoError(t, unix.SetsockoptTimeval(recv, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 10}))

	const srcPort = 40000
	syn := func(seq uint32, corrupt bool) []byte {
		p := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
		header.IPv4(p).Encode(&header.IPv4Fields{
			TotalLength: uint16(len(p)),
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     tcpip.AddrFrom4(hostIP.As4()),
			DstAddr:     tcpip.AddrFrom4(claim.Addr().As4()),
		})
		tcp := header.TCP(p[header.IPv4MinimumSize:])
		tcp.Encode(&header.TCPFields{
			SrcPort:    srcPort,
			DstPort:    claim.Port(),
			SeqNum:     seq,
			DataOffset: header.TCPMinimumSize,
			Flags:      header.TCPFlagSyn,
			WindowSize: 65535,
		})
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpip.AddrFrom4(hostIP.As4()), tcpip.AddrFrom4(claim.Addr().As4()), header.TCPMinimumSize)
		tcp.SetChecksum(^tcp.CalculateChecksum(xsum))
		if corrupt {
			tcp.SetChecksum(tcp.Checksum() ^ 0x0101)
		}
		return p
	}
	to := &unix.SockaddrInet4{Addr: claim.Addr().As4()}
	require.NoError(t, unix.Sendto(send, syn(1000, true), 0, to))
	require.NoError(t, unix.Sendto(send, syn(2000, false), 0, to))

	buf := make([]byte, 1500)
	for {
		m, _, err := unix.Recvfrom(recv, buf, 0)
		require.NoError(t, err, "no SYN-ACK")
		ip := header.IPv4(buf[:m])
		if m < header.IPv4MinimumSize || int(ip.HeaderLength()) > m-header.TCPMinimumSize {
			continue
		}
		tcp := header.TCP(buf[ip.HeaderLength():m])
		if tcp.SourcePort() != claim.Port() || tcp.DestinationPort() != srcPort {
			continue
		}
		require.Equal(t, header.TCPFlagSyn|header.TCPFlagAck, tcp.Flags(), "first answer")
		require.Equal(t, uint32(2001), tcp.AckNumber(), "the first SYN-ACK must answer the good SYN")
		return
	}
}

// TestTUNDeletedDeviceFails: a TUN device deleted under the stack (an
// operator's `ip link del`, a CNI plugin cleaning up) makes the Network
// report its failure, and a proxy on it an Error matching
// proxy.ErrNetworkFailed, instead of passing for ready while nothing
// reaches it. Close then still succeeds.
func TestTUNDeletedDeviceFails(t *testing.T) {
	ctx := testCtx(t)
	ns := tuntest.New(t)
	var n *netstack.Network
	var err error
	ns.Do(func() {
		n, err = netstack.NewTUN(netstack.Options{Logger: quiet}, tun.Config{Name: "tptest0", Local: []netip.Addr{bindIP}})
	})
	require.NoError(t, err)
	var _ proxy.FailingNetwork = n
	p, err := proxy.New(proxy.Config{
		IID: "c-1", Role: "c", Network: n,
		Channels: map[string]proxy.ChannelConfig{"db": {Kind: proxy.KindRequest, Port: 7000}},
		Node:     channels.Config{Members: membership.Static()},
		Logger:   quiet,
	})
	require.NoError(t, err)
	events := proxytest.Record(p.Events())
	require.NoError(t, p.Start(ctx))
	require.Nil(t, n.Err(), "no failure yet")

	ns.Do(func() {
		link, lerr := netlink.LinkByName("tptest0")
		require.NoError(t, lerr)
		require.NoError(t, netlink.LinkDel(link))
	})
	select {
	case <-n.Failed():
	case <-ctx.Done():
		require.FailNow(t, "the Network did not report its deleted device")
	}
	require.Error(t, n.Err())
	var failure proxy.Error
	for failure.Err == nil {
		if e, ok := events.Next(t).(proxy.Error); ok {
			failure = e
		}
	}
	require.ErrorIs(t, failure, proxy.ErrNetworkFailed)
	require.NoError(t, p.Shutdown(ctx))
	events.WaitClosed(t)
	require.NoError(t, n.Close(), "closing a Network whose device is gone")
}

// TestTUNSetDownFails: a TUN device set down (`ip link set down`) loses
// the routes into it, which setting it up again does not restore; the
// Network reports the failure, so that its instance is restarted rather
// than left unreachable while it looks healthy.
func TestTUNSetDownFails(t *testing.T) {
	ctx := testCtx(t)
	n, ns := newTUN(t)
	claim, l := listenClaim(ctx, t, n)
	client, server := pair(t, l, func() (net.Conn, error) { return kernelDial(ns, claim) })
	roundTrip(t, client, server)
	require.Nil(t, n.Err())

	ns.Do(func() {
		link, err := netlink.LinkByName("tptest0")
		require.NoError(t, err)
		require.NoError(t, netlink.LinkSetDown(link))
	})
	select {
	case <-n.Failed():
	case <-ctx.Done():
		require.FailNow(t, "the Network did not report its device set down")
	}
	require.ErrorContains(t, n.Err(), "tptest0 went down")
}
