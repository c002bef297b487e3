package proxy

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/tcpproxy/tcpproxy/channels"
)

// watchMembers applies every membership change of a duplex channel until
// the proxy stops.
func (p *Proxy) watchMembers(cs *channelState, updates <-chan []channels.Member) {
	for {
		select {
		case <-p.ctx.Done():
			return
		case ms, ok := <-updates:
			if !ok {
				return
			}
			if c, changed := p.applyMembersIfChanged(cs, ms); changed {
				p.emit(c)
			}
		}
	}
}

func (p *Proxy) applyMembersIfChanged(cs *channelState, ms []channels.Member) (Change, bool) {
	cs.mu.Lock()
	before := cs.members
	cs.mu.Unlock()
	c := p.applyMembers(cs, ms)
	return c, !slices.Equal(before, c.Members)
}

// applyMembers makes the channel's impostor listeners match ms (connect
// mode) and returns the Change describing the new membership. A listener
// that cannot be opened is reported as an Error event and left out; the
// member stays in the membership and is retried on the next change.
func (p *Proxy) applyMembers(cs *channelState, ms []channels.Member) Change {
	iids := make([]string, 0, len(ms))
	for _, m := range ms {
		iids = append(iids, m.IID)
	}
	if collided, err := p.alloc.Ensure(iids...); err != nil {
		p.emit(Error{Channel: cs.name, Err: fmt.Errorf("membership: %w", err)})
	} else if len(collided) > 0 {
		p.log.Warn("instance ids share a home address; proxies may disagree on their IPs if they joined in another order",
			"channel", cs.name, "iids", collided)
	}

	want := make(map[string]netip.AddrPort, len(ms))
	members := []MemberAddr{{IID: p.cfg.IID, IP: p.bindIP, Port: uint16(cs.cfg.Port), Self: true}}
	for _, m := range ms {
		if m.IID == p.cfg.IID {
			continue
		}
		ip, ok := p.alloc.Lookup(m.IID)
		if !ok {
			continue // address range exhausted, reported above
		}
		port := m.Channels[cs.name]
		if port == 0 {
			port = uint16(cs.cfg.Port)
		}
		want[m.IID] = netip.AddrPortFrom(ip, port)
		members = append(members, MemberAddr{IID: m.IID, IP: ip, Port: port})
	}
	slices.SortFunc(members, func(a, b MemberAddr) int { return cmpString(a.IID, b.IID) })

	if cs.cfg.connects() {
		p.syncImpostors(cs, want)
	}
	cs.mu.Lock()
	cs.members = members
	cs.mu.Unlock()
	return Change{Channel: cs.name, Kind: KindDuplex, Members: slices.Clone(members)}
}

// syncImpostors closes the listeners of members that left or moved and
// opens listeners for members that joined.
func (p *Proxy) syncImpostors(cs *channelState, want map[string]netip.AddrPort) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for iid, imp := range cs.impostors {
		if addr, ok := want[iid]; !ok || addr != imp.addr {
			_ = imp.ln.Close()
			delete(cs.impostors, iid)
			p.log.Info("impostor closed", "channel", cs.name, "member", iid, "addr", imp.addr)
		}
	}
	ids := make([]string, 0, len(want))
	for iid := range want {
		ids = append(ids, iid)
	}
	slices.Sort(ids)
	for _, iid := range ids {
		if _, ok := cs.impostors[iid]; ok {
			continue
		}
		if p.ctx.Err() != nil {
			return // Shutdown closes impostors after cancelling; open none now
		}
		addr := want[iid]
		ln, err := p.cfg.Network.Listen(p.ctx, addr)
		if err != nil {
			p.emit(Error{Channel: cs.name, Err: fmt.Errorf("impostor for member %s at %s: %w", iid, addr, err)})
			continue
		}
		cs.impostors[iid] = &impostor{addr: addr, ln: ln}
		p.log.Info("impostor listening", "channel", cs.name, "member", iid, "addr", addr)
		p.serveListener(cs, ln, p.duplexTarget(cs, iid))
	}
}

// closeImpostors closes every impostor listener of cs.
func (p *Proxy) closeImpostors(cs *channelState) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for iid, imp := range cs.impostors {
		_ = imp.ln.Close()
		delete(cs.impostors, iid)
	}
}
