package proxy

import (
	"net/netip"
	"slices"
)

// ChannelInfo describes where a channel's legacy connections go, for
// status pages; ChannelStats has its counters.
type ChannelInfo struct {
	Channel string
	Kind    Kind
	// Mode is a duplex channel's mode (bind, connect or both).
	Mode Mode
	// Target is a request channel's reply channel on its members.
	Target string
	// Listen are the addresses where the proxy accepts legacy
	// connections: a request channel's request address, a duplex
	// channel's impostors (connect mode), sorted.
	Listen []netip.AddrPort
	// Connect is where incoming streams become legacy connections: the
	// legacy server at the bind IP (reply, duplex bind); invalid for the
	// others.
	Connect netip.AddrPort
	// Members is a duplex channel's membership as last sent in a Change,
	// the local instance included.
	Members []MemberAddr
}

// Channels describes every channel, sorted by name.
func (p *Proxy) Channels() []ChannelInfo {
	out := make([]ChannelInfo, 0, len(p.chans))
	for _, cs := range p.chans {
		ci := ChannelInfo{Channel: cs.name, Kind: cs.cfg.Kind}
		switch cs.cfg.Kind {
		case KindRequest:
			ci.Target = cs.cfg.Target
			if ci.Target == "" {
				ci.Target = cs.name
			}
			ci.Listen = []netip.AddrPort{cs.reqAddr}
		case KindReply:
			ci.Connect = netip.AddrPortFrom(p.bindIP, uint16(cs.cfg.Port))
		case KindDuplex:
			ci.Mode = cs.cfg.mode()
			if cs.cfg.binds() {
				ci.Connect = netip.AddrPortFrom(p.bindIP, uint16(cs.cfg.Port))
			}
			cs.mu.Lock()
			for _, imp := range cs.impostors {
				ci.Listen = append(ci.Listen, imp.addr)
			}
			ci.Members = slices.Clone(cs.members)
			cs.mu.Unlock()
			slices.SortFunc(ci.Listen, netip.AddrPort.Compare)
		}
		out = append(out, ci)
	}
	return out
}

// LookupInstanceIP returns the instance IP of iid without assigning one:
// the address this proxy gave iid, when it did (duplex members, callers),
// else the address iid gives itself (its bind IP; the same on every proxy
// unless iids collide). ok is false only when iid has no address at all.
func (p *Proxy) LookupInstanceIP(iid string) (ip netip.Addr, ok bool) {
	if ip, ok := p.alloc.Lookup(iid); ok {
		return ip, true
	}
	ip, err := BindIP(p.cfg.Addressing, iid)
	return ip, err == nil
}
