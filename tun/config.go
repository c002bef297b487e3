package tun

import (
	"fmt"
	"hash/fnv"
	"log/slog"
	"net/netip"

	"github.com/tcpproxy/tcpproxy/internal/defaults"
)

const (
	// DefaultName is the device name when Config.Name is empty.
	DefaultName = "tcpproxy0"
	// DefaultMTU is the device MTU when Config.MTU is 0: large packets
	// cut the per-packet cost of the userspace stack.
	DefaultMTU = defaults.MTU
	// RulePriority is the priority of the "to <prefix> lookup <table>"
	// rules.
	RulePriority = 50
	// LocalRulePriority is where the `local` rule moves from priority 0.
	LocalRulePriority = 100
	// Offset is the headroom Device.Read and Device.Write need in front of
	// each packet in their buffers (for the virtio-net header).
	Offset = 16
)

// routeProtocol tags the rules and routes this package adds (RTPROT_*
// values above 4 are free for routing daemons), so that Close and Cleanup
// recognise them.
const routeProtocol = 116

// tableBase is the start of the range Table maps names into.
const tableBase = 0x74700000

// Table is the routing table the device called name uses: a stable function
// of the name, so that Cleanup finds it after a crash.
func Table(name string) int {
	h := fnv.New32a()
	h.Write([]byte(name))
	return tableBase | int(h.Sum32()&0xffff)
}

// Defaults of Config.
var (
	DefaultPrefixes = []netip.Prefix{defaults.InstanceRange, defaults.RequestRange}
	DefaultSource   = defaults.HostAddr
)

// Config describes the device and its routing. The zero value selects every
// default.
type Config struct {
	// Name of the device (at most 15 bytes). Default: DefaultName.
	Name string
	// MTU of the device. Default: DefaultMTU.
	MTU int
	// Prefixes are routed into the device. Default: DefaultPrefixes.
	Prefixes []netip.Prefix
	// Source is the source address the kernel gives host connections into
	// the device; it must be a local address. Default: DefaultSource. It
	// stays on the host.
	Source netip.Addr
	// Local are addresses inside Prefixes that stay on the host, such as
	// the instance's bind IP where its legacy servers listen.
	Local []netip.Addr
	// Logger receives diagnostics. Default: slog.Default().
	Logger *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if len(c.Name) > 15 {
		return c, fmt.Errorf("tun: device name %q longer than 15 bytes", c.Name)
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.MTU < 576 || c.MTU > 65535 {
		return c, fmt.Errorf("tun: MTU %d out of range [576, 65535]", c.MTU)
	}
	if len(c.Prefixes) == 0 {
		c.Prefixes = DefaultPrefixes
	}
	for _, p := range c.Prefixes {
		if !p.IsValid() || !p.Addr().Is4() {
			return c, fmt.Errorf("tun: prefix %v: only IPv4 prefixes are supported", p)
		}
	}
	if !c.Source.IsValid() {
		c.Source = DefaultSource
	}
	for _, a := range append([]netip.Addr{c.Source}, c.Local...) {
		if !a.Is4() {
			return c, fmt.Errorf("tun: local address %v is not IPv4", a)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// Cleaned is what Cleanup removed.
type Cleaned struct {
	// Device is true when the TUN device still existed and was deleted.
	Device bool
	// Rules and Routes count the policy rules and the routes of the
	// device's table that were deleted.
	Rules, Routes int
	// LocalRuleRestored is true when the `local` rule was moved back to
	// priority 0.
	LocalRuleRestored bool
}

// Nothing reports whether Cleanup found nothing to remove.
func (c Cleaned) Nothing() bool { return c == Cleaned{} }

func (c Cleaned) String() string {
	if c.Nothing() {
		return "nothing to clean up"
	}
	s := fmt.Sprintf("removed %d rules and %d routes", c.Rules, c.Routes)
	if c.Device {
		s = "deleted the device, " + s
	}
	if c.LocalRuleRestored {
		s += ", moved the local rule back to priority 0"
	}
	return s
}
