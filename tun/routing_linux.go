package tun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routing adds and removes the rules and routes of one device's table.
type routing struct {
	nl    *netlink.Handle
	table int
}

func ipNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// prefixRoute is "<p> dev <link> src <src> table T".
func (r routing) prefixRoute(link int, p netip.Prefix, src netip.Addr) *netlink.Route {
	return &netlink.Route{
		LinkIndex: link,
		Dst:       ipNet(p),
		Src:       src.AsSlice(),
		Table:     r.table,
		Scope:     netlink.SCOPE_LINK,
		Protocol:  routeProtocol,
		Family:    unix.AF_INET,
	}
}

// localRoute is "local <a> dev lo table T": a stays on the host.
func (r routing) localRoute(lo int, a netip.Addr) *netlink.Route {
	return &netlink.Route{
		LinkIndex: lo,
		Dst:       ipNet(netip.PrefixFrom(a, 32)),
		Table:     r.table,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  routeProtocol,
		Family:    unix.AF_INET,
	}
}

// addLocal keeps a on the host. It is idempotent.
func (r routing) addLocal(lo int, a netip.Addr) error {
	if err := r.nl.RouteReplace(r.localRoute(lo, a)); err != nil {
		return fmt.Errorf("tun: add route local %v dev lo table %d: %w", a, r.table, err)
	}
	return nil
}

// removeLocal sends a into the device again. It is idempotent.
func (r routing) removeLocal(lo int, a netip.Addr) error {
	err := r.nl.RouteDel(r.localRoute(lo, a))
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("tun: delete route local %v table %d: %w", a, r.table, err)
	}
	return nil
}

// apply routes prefixes into the device link, except the local addresses.
// On error, the caller runs undo.
func (r routing) apply(link, lo int, prefixes []netip.Prefix, src netip.Addr, locals []netip.Addr) error {
	// The table first, rules last: until the local rule moves, nothing
	// consults the table, so the switch is atomic.
	for _, a := range append([]netip.Addr{src}, locals...) {
		if err := r.addLocal(lo, a); err != nil {
			return err
		}
	}
	for _, p := range prefixes {
		if err := r.nl.RouteReplace(r.prefixRoute(link, p, src)); err != nil {
			return fmt.Errorf("tun: add route %v dev %d src %v table %d: %w", p, link, src, r.table, err)
		}
	}
	for _, p := range prefixes {
		rule := netlink.NewRule()
		rule.Family = unix.AF_INET
		rule.Priority = RulePriority
		rule.Dst = ipNet(p)
		rule.Table = r.table
		rule.Protocol = routeProtocol
		if err := r.nl.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("tun: add rule pref %d to %v lookup %d: %w", RulePriority, p, r.table, err)
		}
	}
	return r.moveLocalRule()
}

// localRule is the rule "lookup local" at priority pref.
func localRule(pref int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = unix.AF_INET
	rule.Priority = pref
	rule.Table = unix.RT_TABLE_LOCAL
	return rule
}

// localRules reports whether the local rule sits at priority 0 and at
// LocalRulePriority.
func (r routing) localRules() (atZero, moved bool, err error) {
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return false, false, fmt.Errorf("tun: list rules: %w", err)
	}
	for _, rule := range rules {
		if rule.Table != unix.RT_TABLE_LOCAL || rule.Dst != nil || rule.Src != nil {
			continue
		}
		switch rule.Priority {
		case 0:
			atZero = true
		case LocalRulePriority:
			moved = true
		}
	}
	return atZero, moved, nil
}

// moveLocalRule moves "lookup local" from priority 0 to LocalRulePriority,
// adding before deleting so that local delivery never stops.
func (r routing) moveLocalRule() error {
	atZero, moved, err := r.localRules()
	if err != nil {
		return err
	}
	if !moved {
		rule := localRule(LocalRulePriority)
		rule.Protocol = routeProtocol
		if err := r.nl.RuleAdd(rule); err != nil {
			return fmt.Errorf("tun: add rule pref %d lookup local: %w", LocalRulePriority, err)
		}
	}
	if atZero {
		if err := r.nl.RuleDel(localRule(0)); err != nil {
			return fmt.Errorf("tun: delete rule pref 0 lookup local: %w", err)
		}
	}
	return nil
}

// undo removes this table's rules and routes and, unless another device of
// this package still routes through the namespace, puts the local rule
// back at priority 0. It is idempotent and keeps going after errors,
// returning them joined.
func (r routing) undo() (Cleaned, error) {
	var errs []error
	var c Cleaned
	rules, lerr := r.nl.RuleList(unix.AF_INET)
	if lerr != nil {
		return c, fmt.Errorf("tun: list rules: %w", lerr)
	}
	others := false
	for _, rule := range rules {
		switch {
		case rule.Table == r.table:
			if err := r.nl.RuleDel(&rule); err == nil {
				c.Rules++
			} else if !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("tun: delete rule %v: %w", rule, err))
			}
		case rule.Protocol == routeProtocol && rule.Table != unix.RT_TABLE_LOCAL:
			others = true
		}
	}
	if !others {
		atZero, moved, lerr := r.localRules()
		switch {
		case lerr != nil:
			errs = append(errs, lerr)
		default:
			if !atZero {
				if err := r.nl.RuleAdd(localRule(0)); err == nil {
					c.LocalRuleRestored = true
				} else if !errors.Is(err, unix.EEXIST) {
					errs = append(errs, fmt.Errorf("tun: add rule pref 0 lookup local: %w", err))
				}
			}
			if moved {
				if err := r.nl.RuleDel(localRule(LocalRulePriority)); err == nil {
					c.LocalRuleRestored = true
				} else if !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("tun: delete rule pref %d lookup local: %w", LocalRulePriority, err))
				}
			}
		}
	}
	routes, lerr := r.nl.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: r.table}, netlink.RT_FILTER_TABLE)
	if lerr != nil {
		errs = append(errs, fmt.Errorf("tun: list routes of table %d: %w", r.table, lerr))
	}
	for _, route := range routes {
		if err := r.nl.RouteDel(&route); err == nil {
			c.Routes++
		} else if !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("tun: delete route %v: %w", route, err))
		}
	}
	return c, errors.Join(errs...)
}
