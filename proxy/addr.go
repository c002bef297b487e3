package proxy

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/tcpproxy/tcpproxy/internal/defaults"
)

// Default address ranges, as in the original @kumori/tcp-proxy.
var (
	// DefaultInstanceRange holds one address per instance id:
	// 127.0.0.2 – 127.0.255.254.
	DefaultInstanceRange = defaults.InstanceRange
	// DefaultRequestRange holds the instance-local request addresses, one
	// per request channel: 127.1.0.1 – 127.1.255.254.
	DefaultRequestRange = defaults.RequestRange
	loopbackNet         = netip.MustParsePrefix("127.0.0.0/8")
)

// ErrAddressesExhausted is returned when a range has no free address left.
var ErrAddressesExhausted = errors.New("address range exhausted")

// Addressing says which ranges the synthetic addresses come from. Both
// ranges must be IPv4 prefixes inside 127.0.0.0/8 that do not overlap.
// Giving each proxy on one host its own pair of ranges (for example
// 127.10.0.0/16 and 127.11.0.0/16) lets several loopback-mode proxies share
// a host in tests and demos without their listeners clashing; in production
// every instance has its own network namespace and uses the defaults.
type Addressing struct {
	InstanceRange netip.Prefix `yaml:"instanceRange"`
	RequestRange  netip.Prefix `yaml:"requestRange"`
}

// WithDefaults fills unset ranges.
func (a Addressing) WithDefaults() Addressing {
	if !a.InstanceRange.IsValid() {
		a.InstanceRange = DefaultInstanceRange
	}
	if !a.RequestRange.IsValid() {
		a.RequestRange = DefaultRequestRange
	}
	return a
}

// Validate checks both ranges.
func (a Addressing) Validate() error {
	a = a.WithDefaults()
	for _, r := range []struct {
		name string
		p    netip.Prefix
	}{{"instanceRange", a.InstanceRange}, {"requestRange", a.RequestRange}} {
		if !r.p.Addr().Is4() || !loopbackNet.Contains(r.p.Addr()) || r.p.Bits() < 8 {
			return fmt.Errorf("addressing: %s %s is not an IPv4 prefix inside 127.0.0.0/8", r.name, r.p)
		}
		if r.p.Bits() > 30 {
			return fmt.Errorf("addressing: %s %s is too small (at most /30)", r.name, r.p)
		}
	}
	if a.InstanceRange.Overlaps(a.RequestRange) {
		return fmt.Errorf("addressing: instanceRange %s overlaps requestRange %s", a.InstanceRange, a.RequestRange)
	}
	return nil
}

// BindIP is the instance IP a proxy with addressing a gives itself: the
// home slot of iid, as the proxy assigns its own iid first.
func BindIP(a Addressing, iid string) (netip.Addr, error) {
	return NewInstanceAllocator(a.WithDefaults().InstanceRange).Add(iid)
}

// span describes the usable addresses of a prefix: first, and how many.
type span struct {
	first uint32
	size  uint32
}

// instanceSpan skips the network address and the first host (127.0.0.1 is
// the host's own loopback address in the default range) and the last one.
func instanceSpan(p netip.Prefix) span {
	base := ipToU32(p.Masked().Addr())
	total := uint32(1) << (32 - p.Bits())
	return span{first: base + 2, size: total - 3}
}

// requestSpan skips the network address and the last one.
func requestSpan(p netip.Prefix) span {
	base := ipToU32(p.Masked().Addr())
	total := uint32(1) << (32 - p.Bits())
	return span{first: base + 1, size: total - 2}
}

func ipToU32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func u32ToIP(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// InstanceAllocator maps instance ids to instance IPs.
//
// The mapping: an iid's home slot is FNV-1a-64(iid) modulo the number of
// usable addresses in the range, so every proxy computes the same address
// for the same iid, on every host and across restarts, without talking to
// each other. Two iids can share a home slot; then the one that sorts first
// (by home slot, then iid) among those assigned together keeps it and the
// other takes the next free slot (linear probing, wrapping inside the
// range). Assignments are sticky: a member keeps its address while it is
// known, whatever joins later. Proxies therefore agree on every address
// except in the rare case where colliding iids joined different proxies in
// a different order; Assign reports collisions so they can be logged.
// When every slot is taken Assign fails with ErrAddressesExhausted: it
// never wraps onto an address in use.
type InstanceAllocator struct {
	mu     sync.Mutex
	span   span
	byIID  map[string]uint32
	bySlot map[uint32]string
}

// NewInstanceAllocator returns an allocator over the usable addresses of
// prefix (see Addressing).
func NewInstanceAllocator(prefix netip.Prefix) *InstanceAllocator {
	return &InstanceAllocator{
		span:   instanceSpan(prefix),
		byIID:  make(map[string]uint32),
		bySlot: make(map[uint32]string),
	}
}

func (a *InstanceAllocator) home(iid string) uint32 {
	h := fnv.New64a()
	h.Write([]byte(iid))
	return uint32(h.Sum64() % uint64(a.span.size))
}

// Assign makes the known set of iids exactly iids: new ones get addresses,
// absent ones release theirs. It returns the iids that did not get their
// home slot because another iid held it.
func (a *InstanceAllocator) Assign(iids []string) (collided []string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	want := make(map[string]bool, len(iids))
	for _, iid := range iids {
		want[iid] = true
	}
	for iid, slot := range a.byIID {
		if !want[iid] {
			delete(a.byIID, iid)
			delete(a.bySlot, slot)
		}
	}
	return a.addLocked(iids)
}

// Ensure assigns addresses to the iids that have none yet, keeping every
// existing assignment, and returns the iids that missed their home slot.
func (a *InstanceAllocator) Ensure(iids ...string) (collided []string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.addLocked(iids)
}

// Add assigns an address to iid if it has none, and returns it.
func (a *InstanceAllocator) Add(iid string) (netip.Addr, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.addLocked([]string{iid}); err != nil {
		return netip.Addr{}, err
	}
	return u32ToIP(a.span.first + a.byIID[iid]), nil
}

// addLocked assigns slots to the iids without one, in (home slot, iid)
// order so that a set assigned at once maps the same way on every proxy.
func (a *InstanceAllocator) addLocked(iids []string) (collided []string, err error) {
	var fresh []string
	seen := make(map[string]bool, len(iids))
	for _, iid := range iids {
		if _, ok := a.byIID[iid]; !ok && !seen[iid] {
			seen[iid] = true
			fresh = append(fresh, iid)
		}
	}
	slices.SortFunc(fresh, func(x, y string) int {
		if hx, hy := a.home(x), a.home(y); hx != hy {
			return cmp.Compare(hx, hy)
		}
		return strings.Compare(x, y)
	})
	for _, iid := range fresh {
		if uint32(len(a.bySlot)) >= a.span.size {
			return collided, fmt.Errorf("assign address to instance %q: %w (%d addresses)", iid, ErrAddressesExhausted, a.span.size)
		}
		slot := a.home(iid)
		if _, taken := a.bySlot[slot]; taken {
			collided = append(collided, iid)
			for taken {
				slot = (slot + 1) % a.span.size
				_, taken = a.bySlot[slot]
			}
		}
		a.byIID[iid] = slot
		a.bySlot[slot] = iid
	}
	return collided, nil
}

// Lookup returns the address assigned to iid.
func (a *InstanceAllocator) Lookup(iid string) (netip.Addr, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	slot, ok := a.byIID[iid]
	if !ok {
		return netip.Addr{}, false
	}
	return u32ToIP(a.span.first + slot), true
}

// IIDOf returns the iid assigned to ip, if any.
func (a *InstanceAllocator) IIDOf(ip netip.Addr) (string, bool) {
	if !ip.Is4() {
		return "", false
	}
	v := ipToU32(ip)
	if v < a.span.first || v-a.span.first >= a.span.size {
		return "", false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	iid, ok := a.bySlot[v-a.span.first]
	return iid, ok
}

// RequestIPs assigns one request address per request channel: channel
// names in sorted order take consecutive addresses from the start of the
// range, so the same configuration always yields the same addresses.
func RequestIPs(prefix netip.Prefix, channels []string) (map[string]netip.Addr, error) {
	s := requestSpan(prefix)
	names := slices.Clone(channels)
	slices.Sort(names)
	if uint64(len(names)) > uint64(s.size) {
		return nil, fmt.Errorf("request addresses: %d request channels but range %s holds %d: %w", len(names), prefix, s.size, ErrAddressesExhausted)
	}
	out := make(map[string]netip.Addr, len(names))
	for i, n := range names {
		out[n] = u32ToIP(s.first + uint32(i))
	}
	return out, nil
}
