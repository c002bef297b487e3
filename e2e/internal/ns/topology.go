//go:build linux

package ns

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
)

// NamePrefix starts every namespace this package's users create, so that
// scripts/netns/cleanup.sh can find leftovers.
const NamePrefix = "tp-"

// RandomPrefix returns "tp-" and six random hex digits.
func RandomPrefix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return NamePrefix + hex.EncodeToString(b)
}

// Net is a set of host namespaces, each joined by a veth pair to a bridge
// that lives in a namespace of its own.
type Net struct {
	Prefix string
	Bridge *Namespace
	Hosts  []*Host
	Subnet netip.Prefix
}

// Host is one "machine": a namespace with lo and eth0 (Addr/24), the
// other end of whose veth is BridgePort on the bridge.
type Host struct {
	*Namespace
	Index      int // 1-based
	Addr       netip.Addr
	Dev        string // the host side of the veth: eth0
	BridgePort string // the bridge side of the veth, in the bridge namespace
}

// NewNet creates the bridge namespace and hosts host namespaces named
// PREFIX-br and PREFIX-hN, with addresses subnet.N. On error everything
// made so far is removed.
func NewNet(prefix string, hosts int, subnet netip.Prefix) (_ *Net, err error) {
	if !subnet.Addr().Is4() || subnet.Bits() > 24 || hosts < 1 || hosts > 200 {
		return nil, fmt.Errorf("bad network %v with %d hosts", subnet, hosts)
	}
	n := &Net{Prefix: prefix, Subnet: subnet.Masked()}
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Delete())
		}
	}()
	if n.Bridge, err = Create(prefix + "-br"); err != nil {
		return nil, err
	}
	if err = n.Bridge.IP("link", "add", "br0", "type", "bridge"); err != nil {
		return nil, err
	}
	if err = n.Bridge.IP("link", "set", "br0", "up"); err != nil {
		return nil, err
	}
	base := n.Subnet.Addr().As4()
	for i := 1; i <= hosts; i++ {
		ns, err := Create(fmt.Sprintf("%s-h%d", prefix, i))
		if err != nil {
			return nil, err
		}
		a := base
		a[3] = byte(i)
		h := &Host{Namespace: ns, Index: i, Addr: netip.AddrFrom4(a), Dev: "eth0", BridgePort: fmt.Sprintf("vh%d", i)}
		n.Hosts = append(n.Hosts, h)
		// Both ends are created in the bridge namespace and one is moved
		// straight into the host: the root namespace never sees them.
		if err := n.Bridge.IP("link", "add", h.BridgePort, "type", "veth", "peer", "name", h.Dev, "netns", ns.Name); err != nil {
			return nil, err
		}
		if err := n.Bridge.IP("link", "set", h.BridgePort, "master", "br0", "up"); err != nil {
			return nil, err
		}
		if err := ns.IP("addr", "add", fmt.Sprintf("%s/%d", h.Addr, n.Subnet.Bits()), "dev", h.Dev); err != nil {
			return nil, err
		}
		if err := ns.IP("link", "set", h.Dev, "up"); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// Delete removes every namespace of the net (killing what runs there).
func (n *Net) Delete() error {
	var errs []error
	for _, h := range n.Hosts {
		errs = append(errs, h.Delete())
	}
	if n.Bridge != nil {
		errs = append(errs, n.Bridge.Delete())
	}
	return errors.Join(errs...)
}

// LinkDown takes the host's link down at the bridge, like a pulled cable:
// the host keeps its address and routes, its packets go nowhere, and no
// RST or ICMP tells anyone.
func (n *Net) LinkDown(h *Host) error { return n.Bridge.IP("link", "set", h.BridgePort, "down") }

// LinkUp restores a link taken down by LinkDown.
func (n *Net) LinkUp(h *Host) error { return n.Bridge.IP("link", "set", h.BridgePort, "up") }
