package proxytest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// HostSockets is the kernel as a Host.
type HostSockets struct{}

// Listen listens with an ordinary socket.
func (HostSockets) Listen(ctx context.Context, addr netip.AddrPort) (net.Listener, error) {
	var lc net.ListenConfig
	return lc.Listen(ctx, "tcp4", addr.String())
}

// Dial connects with an ordinary socket.
func (HostSockets) Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp4", addr.String())
}

// LoopbackInstance gives the i-th proxy of a test the loopback network
// with its own pair of /16 ranges, 127.(10+2i).0.0/16 and
// 127.(11+2i).0.0/16, so that proxies sharing this host never clash.
func LoopbackInstance(t testing.TB, i int) Instance {
	if i > 100 {
		t.Fatalf("loopback instance %d: out of /16 ranges", i)
	}
	return Instance{
		Network: proxy.NewLoopback(),
		Host:    HostSockets{},
		Addressing: proxy.Addressing{
			InstanceRange: netip.MustParsePrefix(fmt.Sprintf("127.%d.0.0/16", 10+2*i)),
			RequestRange:  netip.MustParsePrefix(fmt.Sprintf("127.%d.0.0/16", 11+2*i)),
		},
	}
}
