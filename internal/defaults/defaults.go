// Package defaults holds the settings that several of tcpproxy's packages
// must agree on, so that each is written once: the synthetic address
// ranges (the proxy allocates from them, the gVisor stack and the TUN
// routes carry them), the link MTU, the host's own loopback address and
// the timeout of a dial. The packages export them under their own names.
package defaults

import (
	"net/netip"
	"time"
)

var (
	// InstanceRange holds one address per instance id, 127.0.0.2 –
	// 127.0.255.254, as in the original @kumori/tcp-proxy.
	InstanceRange = netip.MustParsePrefix("127.0.0.0/16")
	// RequestRange holds the instance-local request addresses, one per
	// request channel: 127.1.0.1 – 127.1.255.254.
	RequestRange = netip.MustParsePrefix("127.1.0.0/16")
	// HostAddr is the host's own loopback address: the source of the
	// routes into a TUN device, and the address of the stand-in host of an
	// in-memory network.
	HostAddr = netip.MustParseAddr("127.0.0.1")
)

// MTU of a TUN device and of the in-memory link. Per-packet cost dominates
// a userspace stack, so links carry near-maximal IPv4 packets.
const MTU = 65000

// DialTimeout bounds a connection attempt: to the legacy server, or to
// another proxy.
const DialTimeout = 5 * time.Second
