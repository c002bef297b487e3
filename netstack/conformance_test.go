package netstack_test

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
	"github.com/tcpproxy/tcpproxy/tun"
	"github.com/tcpproxy/tcpproxy/tun/tuntest"
)

// Each proxy of a conformance test gets a network of its own, so all use
// the default ranges.
var defaultAddressing = proxy.Addressing{
	InstanceRange: netstack.DefaultInstancePrefix,
	RequestRange:  netstack.DefaultRequestPrefix,
}

func TestConformanceMemory(t *testing.T) {
	proxytest.Run(t, func(t testing.TB, _ int) proxytest.Instance {
		n, h := newMemory(t)
		return proxytest.Instance{Network: n, Host: h, Addressing: defaultAddressing}
	})
}

func TestConformanceTUN(t *testing.T) {
	tuntest.Skip(t)
	proxytest.Run(t, func(t testing.TB, _ int) proxytest.Instance {
		n, ns := newTUN(t)
		return proxytest.Instance{Network: n, Host: nsHost{ns: ns, dev: n.TUN()}, Addressing: defaultAddressing}
	})
}

// nsHost is the kernel of a test's network namespace as a proxytest.Host.
type nsHost struct {
	ns  *tuntest.NS
	dev *tun.Device
}

// Listen keeps addr's IP on the host, as the bind IP is in production, and
// listens with a kernel socket.
func (h nsHost) Listen(ctx context.Context, addr netip.AddrPort) (l net.Listener, err error) {
	if err := h.dev.AddLocal(addr.Addr()); err != nil {
		return nil, err
	}
	h.ns.Do(func() {
		var lc net.ListenConfig
		l, err = lc.Listen(ctx, "tcp4", addr.String())
	})
	return l, err
}

// Dial connects with a kernel socket.
func (h nsHost) Dial(ctx context.Context, addr netip.AddrPort) (c net.Conn, err error) {
	h.ns.Do(func() {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp4", addr.String())
	})
	return c, err
}
