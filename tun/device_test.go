package tun_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/internal/virtio"
	"github.com/tcpproxy/tcpproxy/tun"
	"github.com/tcpproxy/tcpproxy/tun/tuntest"
)

// quiet discards the devices' Info logs.
var quiet = slog.New(slog.DiscardHandler)

var (
	bindIP      = netip.MustParseAddr("127.0.0.2")
	syntheticIP = netip.MustParseAddr("127.0.5.5")
)

// state is what the tests inspect of a namespace's routing.
type state struct {
	localRulePrefs []int
	tableRules     int
	tableRoutes    []string
	routeLocalnet  string
}

func readState(t *testing.T, ns *tuntest.NS, name string) state {
	t.Helper()
	var s state
	var err error
	ns.Do(func() {
		var rules []netlink.Rule
		rules, err = netlink.RuleList(unix.AF_INET)
		if err != nil {
			return
		}
		for _, r := range rules {
			switch r.Table {
			case unix.RT_TABLE_LOCAL:
				s.localRulePrefs = append(s.localRulePrefs, r.Priority)
			case tun.Table(name):
				s.tableRules++
			}
		}
		var routes []netlink.Route
		routes, err = netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: tun.Table(name)}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return
		}
		for _, r := range routes {
			kind := "unicast"
			if r.Type == unix.RTN_LOCAL {
				kind = "local"
			}
			s.tableRoutes = append(s.tableRoutes, kind+" "+r.Dst.String())
		}
		var b []byte
		b, err = os.ReadFile("/proc/sys/net/ipv4/conf/all/route_localnet")
		s.routeLocalnet = strings.TrimSpace(string(b))
	})
	require.NoError(t, err)
	return s
}

func TestCreateRoutesSyntheticRangesIntoDevice(t *testing.T) {
	ns := tuntest.New(t)
	const name = "tptest0"
	before := readState(t, ns, name)
	require.Equal(t, []int{0}, before.localRulePrefs)

	var dev *tun.Device
	var err error
	ns.Do(func() { dev, err = tun.Create(tun.Config{Logger: quiet, Name: name, Local: []netip.Addr{bindIP}}) })
	require.NoError(t, err)
	defer dev.Close()
	assert.Equal(t, name, dev.Name())
	assert.Equal(t, tun.DefaultMTU, dev.MTU())

	s := readState(t, ns, name)
	assert.Equal(t, []int{tun.LocalRulePriority}, s.localRulePrefs, "the local rule moves behind ours")
	assert.Equal(t, 2, s.tableRules)
	assert.ElementsMatch(t, []string{
		"unicast 127.0.0.0/16", "unicast 127.1.0.0/16", "local 127.0.0.1/32", "local 127.0.0.2/32",
	}, s.tableRoutes)
	assert.Equal(t, before.routeLocalnet, s.routeLocalnet, "the device's route_localnet is enough")

	// A host connection to a synthetic address comes out of the device as
	// a SYN from 127.0.0.1; the kernel retries until the dial is cancelled.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dialed := dialSynthetic(ctx, ns)
	src, dst, syn := readSYN(t, dev)
	cancel()
	require.Error(t, <-dialed)
	assert.Equal(t, "127.0.0.1", src.String())
	assert.Equal(t, netip.AddrPortFrom(syntheticIP, 80), dst)
	assert.True(t, syn)

	// Closing restores the namespace.
	require.NoError(t, dev.Close())
	require.NoError(t, dev.Close(), "Close is idempotent")
	after := readState(t, ns, name)
	assert.Equal(t, before, after)
}

// readSYN reads packets from dev until a TCP one arrives and returns its
// source, destination and whether it is a SYN.
func readSYN(t *testing.T, dev *tun.Device) (src netip.Addr, dst netip.AddrPort, syn bool) {
	t.Helper()
	bufs := make([][]byte, dev.BatchSize())
	for i := range bufs {
		bufs[i] = make([]byte, tun.Offset+65535)
	}
	sizes := make([]int, len(bufs))
	for {
		n, err := dev.Read(bufs, sizes, tun.Offset)
		require.NoError(t, err)
		for i := range n {
			p := bufs[i][tun.Offset : tun.Offset+sizes[i]]
			if len(p) < 40 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_TCP {
				continue
			}
			ihl := int(p[0]&0xf) * 4
			src = netip.AddrFrom4([4]byte(p[12:16]))
			dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), uint16(p[ihl+2])<<8|uint16(p[ihl+3]))
			return src, dst, p[ihl+13]&0x02 != 0
		}
	}
}

func TestLocalAddresses(t *testing.T) {
	ns := tuntest.New(t)
	const name = "tptest1"
	var dev *tun.Device
	var err error
	ns.Do(func() { dev, err = tun.Create(tun.Config{Logger: quiet, Name: name}) })
	require.NoError(t, err)
	defer dev.Close()

	require.NoError(t, dev.AddLocal(bindIP))
	require.NoError(t, dev.AddLocal(bindIP), "AddLocal is idempotent")
	assert.Contains(t, readState(t, ns, name).tableRoutes, "local 127.0.0.2/32")
	require.NoError(t, dev.RemoveLocal(bindIP))
	require.NoError(t, dev.RemoveLocal(bindIP), "RemoveLocal is idempotent")
	assert.NotContains(t, readState(t, ns, name).tableRoutes, "local 127.0.0.2/32")
	require.Error(t, dev.RemoveLocal(tun.DefaultSource))
}

func TestCleanupAfterCrash(t *testing.T) {
	ns := tuntest.New(t)
	const name = "tptest2"
	before := readState(t, ns, name)
	var dev *tun.Device
	var err error
	ns.Do(func() { dev, err = tun.Create(tun.Config{Logger: quiet, Name: name, Local: []netip.Addr{bindIP}}) })
	require.NoError(t, err)

	// The device is open: an instance runs on it, and Cleanup leaves it
	// and its routing alone.
	var cleaned tun.Cleaned
	ns.Do(func() { cleaned, err = tun.Cleanup(name) })
	require.ErrorIs(t, err, tun.ErrInUse)
	assert.True(t, cleaned.Nothing())
	s := readState(t, ns, name)
	assert.Positive(t, s.tableRules, "the running instance's routing stays")

	// As if the process had died (forced, since this test's process still
	// holds the device): ForceCleanup removes the routing and the device
	// and says so; a second Cleanup finds nothing left.
	for i := range 2 {
		ns.Do(func() { cleaned, err = tun.ForceCleanup(name) })
		require.NoError(t, err)
		s := readState(t, ns, name)
		assert.Equal(t, before.localRulePrefs, s.localRulePrefs)
		assert.Zero(t, s.tableRules)
		assert.Empty(t, s.tableRoutes)
		if i == 0 {
			assert.True(t, cleaned.Device, "the device is deleted")
			assert.Positive(t, cleaned.Rules)
			assert.Positive(t, cleaned.Routes)
			assert.True(t, cleaned.LocalRuleRestored)
			assert.False(t, cleaned.Nothing())
		} else {
			assert.True(t, cleaned.Nothing(), "second cleanup: %v", cleaned)
		}
	}
	require.NoError(t, dev.Close(), "Close after Cleanup")

	// Cleanup of a namespace that never had a device is a no-op.
	ns.Do(func() { cleaned, err = tun.Cleanup("never-made") })
	require.NoError(t, err)
	assert.Equal(t, "nothing to clean up", cleaned.String())
}

func TestTwoDevicesShareTheLocalRule(t *testing.T) {
	ns := tuntest.New(t)
	var a, b *tun.Device
	var errA, errB error
	ns.Do(func() {
		a, errA = tun.Create(tun.Config{Logger: quiet, Name: "tpa", Prefixes: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/16")}})
		b, errB = tun.Create(tun.Config{Logger: quiet, Name: "tpb", Prefixes: []netip.Prefix{netip.MustParsePrefix("127.1.0.0/16")}})
	})
	require.NoError(t, errA)
	require.NoError(t, errB)
	defer b.Close()
	require.NoError(t, a.Close())
	s := readState(t, ns, "tpb")
	assert.Equal(t, []int{tun.LocalRulePriority}, s.localRulePrefs, "b still needs the local rule moved")
	assert.Equal(t, 1, s.tableRules)
	require.NoError(t, b.Close())
	s = readState(t, ns, "tpb")
	assert.Equal(t, []int{0}, s.localRulePrefs)
	assert.Zero(t, s.tableRules)
}

func TestConfigValidation(t *testing.T) {
	// Privileged, in a namespace of its own all the same, in case a bad
	// config ever got through.
	do := func(f func()) { f() }
	if os.Geteuid() == 0 {
		do = tuntest.New(t).Do
	}
	for _, cfg := range []tun.Config{
		{Name: "a-name-much-too-long"},
		{MTU: 100},
		{Prefixes: []netip.Prefix{netip.MustParsePrefix("::1/128")}},
	} {
		var err error
		do(func() { _, err = tun.Create(cfg) })
		require.Error(t, err)
		require.False(t, errors.Is(err, tun.ErrUnavailable), "a bad config is not a missing privilege: %v", err)
	}
}

func TestCreateWithoutCapabilityIsUnavailable(t *testing.T) {
	ns := tuntest.New(t)
	var err error
	ns.Do(func() {
		// Capabilities are per thread: this drops them for the namespace's
		// thread only, which dies with the namespace.
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err = unix.Capset(&hdr, &data[0]); err != nil {
			return
		}
		_, err = tun.Create(tun.Config{Name: "tpcap"})
	})
	require.ErrorIs(t, err, tun.ErrUnavailable)
	require.ErrorIs(t, err, unix.EPERM)
	assert.Contains(t, err.Error(), "network: loopback")
}

// TestFramesCarryOffloads shows what the netstack link relies on: a packet
// of a host socket comes out of ReadFrame with its TCP checksum left
// partial (VIRTIO_NET_HDR_F_NEEDS_CSUM), and Close ends a blocked
// ReadFrame with os.ErrClosed.
func TestFramesCarryOffloads(t *testing.T) {
	ns := tuntest.New(t)
	var dev *tun.Device
	var err error
	ns.Do(func() { dev, err = tun.Create(tun.Config{Logger: quiet, Name: "tpframe"}) })
	require.NoError(t, err)
	defer dev.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dialed := dialSynthetic(ctx, ns)
	vnet := make([]byte, virtio.NetHdrLen)
	pkt := make([]byte, 65536)
	for {
		n, err := dev.ReadFrame([][]byte{vnet, pkt})
		require.NoError(t, err)
		p := pkt[:n-virtio.NetHdrLen]
		if len(p) < 40 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_TCP {
			continue
		}
		var h virtio.NetHdr
		h.Decode(vnet)
		assert.Equal(t, virtio.NetHdr{
			Flags:      virtio.FlagNeedsCsum,
			HdrLen:     h.HdrLen, // the kernel's business
			CsumStart:  uint16(p[0]&0xf) * 4,
			CsumOffset: 16,
		}, h)
		var again virtio.NetHdr
		b := make([]byte, virtio.NetHdrLen)
		h.Encode(b)
		again.Decode(b)
		assert.Equal(t, h, again)
		assert.Equal(t, vnet, b)
		break
	}
	cancel()
	require.Error(t, <-dialed)

	read := make(chan error, 1)
	go func() {
		for {
			if _, err := dev.ReadFrame([][]byte{vnet, pkt}); err != nil {
				read <- err
				return
			}
		}
	}()
	require.NoError(t, dev.Close())
	require.ErrorIs(t, <-read, os.ErrClosed)
	require.ErrorIs(t, dev.WriteFrame([][]byte{make([]byte, virtio.NetHdrLen)}), os.ErrClosed)
}

// dialSynthetic dials syntheticIP:80 from ns in the background, until ctx
// ends, and sends the dial's outcome.
func dialSynthetic(ctx context.Context, ns *tuntest.NS) <-chan error {
	dialed := make(chan error, 1)
	go ns.Do(func() {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(syntheticIP, 80).String())
		if err == nil {
			c.Close()
		}
		dialed <- err
	})
	return dialed
}
