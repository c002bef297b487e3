package netstack

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/tcpproxy/tcpproxy/internal/defaults"
)

// The synthetic ranges, instance IPs and request IPs (the proxy's default
// Addressing). They are the default Options.Prefixes.
var (
	DefaultInstancePrefix = defaults.InstanceRange
	DefaultRequestPrefix  = defaults.RequestRange
)

const (
	// DefaultMTU is the MTU of the in-memory link. Per-packet cost
	// dominates a userspace stack, so the link carries near-maximal IPv4
	// packets.
	DefaultMTU = defaults.MTU
	// DefaultMaxBufferSize caps TCP send and receive buffers. gVisor's
	// default cap (4 MiB) and its smaller defaults limit throughput as soon
	// as the path has real RTT.
	DefaultMaxBufferSize = 8 << 20
	// DefaultBacklog is how many handshaken connections a listener queues
	// before Accept, as Linux's default somaxconn; beyond it SYNs are
	// answered with SYN cookies or dropped, as a kernel does.
	DefaultBacklog = 4096
)

// DefaultHostAddr is the host stack's own address in NewMemory: the source
// of the host's connections, as 127.0.0.1 is on a real host.
var DefaultHostAddr = defaults.HostAddr

// Options configure a Network. The zero value selects every default.
type Options struct {
	// Prefixes are the synthetic ranges that live in the proxy's stack.
	// Default: DefaultInstancePrefix and DefaultRequestPrefix.
	Prefixes []netip.Prefix
	// Addr is the proxy stack's own address, the source of a Dial without
	// src. It must lie in Prefixes so that replies are routed back, and must
	// not be an address the proxy allocates. Default: the last usable
	// address of the last prefix (127.1.255.254), which request-IP
	// allocation from the bottom of the range does not reach in practice.
	Addr netip.Addr
	// MTU of the link. Default: DefaultMTU (NewMemory) or the TUN's MTU.
	MTU int
	// MaxBufferSize caps each connection's TCP send and receive buffers;
	// receive buffers grow to it by moderation. Default: DefaultMaxBufferSize.
	MaxBufferSize int
	// Backlog is the per-listener queue of connections not yet accepted
	// (of the Network's and the Host's listeners). Default: DefaultBacklog.
	Backlog int
	// HostAddr is the host stack's own address (NewMemory only).
	// Default: DefaultHostAddr.
	HostAddr netip.Addr
	// Logger receives diagnostics. Default: slog.Default().
	Logger *slog.Logger
}

// withDefaults returns o with every zero field set to its default, or an
// error if a field is unusable.
func (o Options) withDefaults() (Options, error) {
	if len(o.Prefixes) == 0 {
		o.Prefixes = []netip.Prefix{DefaultInstancePrefix, DefaultRequestPrefix}
	}
	for _, p := range o.Prefixes {
		if !p.IsValid() || !p.Addr().Is4() {
			return o, fmt.Errorf("netstack: prefix %v: only IPv4 prefixes are supported", p)
		}
	}
	if !o.Addr.IsValid() {
		last := o.Prefixes[len(o.Prefixes)-1].Masked()
		o.Addr = lastUsable(last)
	}
	if !o.Addr.Is4() || !containedIn(o.Addr, o.Prefixes) {
		return o, fmt.Errorf("netstack: address %v must be an IPv4 address inside %v", o.Addr, o.Prefixes)
	}
	if o.MTU == 0 {
		o.MTU = DefaultMTU
	}
	if o.MTU < 576 || o.MTU > 65535 {
		return o, fmt.Errorf("netstack: MTU %d out of range [576, 65535]", o.MTU)
	}
	if o.MaxBufferSize == 0 {
		o.MaxBufferSize = DefaultMaxBufferSize
	}
	if o.Backlog <= 0 {
		o.Backlog = DefaultBacklog
	}
	if !o.HostAddr.IsValid() {
		o.HostAddr = DefaultHostAddr
	}
	if !o.HostAddr.Is4() {
		return o, fmt.Errorf("netstack: host address %v is not IPv4", o.HostAddr)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// lastUsable returns the highest address of p below its broadcast address.
func lastUsable(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= ^uint32(0) >> p.Bits()
	v--
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func containedIn(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
