package netstack

import (
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// memLink is one end of an in-memory point-to-point link between two gVisor
// stacks: a packet written at one end is delivered, in the writer's
// goroutine, to the stack attached at the other end. It is gVisor's
// link/pipe with two changes: a peer that detaches concurrently is
// tolerated (either stack may close first), and checksums are skipped
// because no byte can be corrupted between the two ends.
//
// Delivery is synchronous and cheap: the receiving stack only parses
// headers and queues the segment for its TCP processor goroutines.
type memLink struct {
	peer *memLink

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	mtu        uint32
}

var _ stack.LinkEndpoint = (*memLink)(nil)

// newMemLink returns both ends of a new link.
func newMemLink(mtu uint32) (*memLink, *memLink) {
	a, b := &memLink{mtu: mtu}, &memLink{mtu: mtu}
	a.peer, b.peer = b, a
	return a, b
}

// WritePackets implements stack.LinkWriter.
func (e *memLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	e.peer.mu.RLock()
	d := e.peer.dispatcher
	e.peer.mu.RUnlock()
	if d == nil {
		// The far stack has gone: the wire is cut, packets are lost.
		return pkts.Len(), nil
	}
	for _, pkt := range pkts.AsSlice() {
		// A fresh packet sharing pkt's bytes, without the sender's parsed
		// header state.
		in := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: pkt.ToBuffer()})
		d.DeliverNetworkPacket(pkt.NetworkProtocolNumber, in)
		in.DecRef()
	}
	return pkts.Len(), nil
}

// Attach implements stack.NetworkLinkEndpoint.
func (e *memLink) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (e *memLink) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// MTU implements stack.NetworkLinkEndpoint.
func (e *memLink) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}

// SetMTU implements stack.NetworkLinkEndpoint.
func (e *memLink) SetMTU(mtu uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mtu = mtu
}

// Capabilities implements stack.NetworkLinkEndpoint. The link is lossless
// and cannot corrupt data, so neither side computes or verifies checksums.
func (*memLink) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload | stack.CapabilityTXChecksumOffload
}

// Wait implements stack.NetworkLinkEndpoint; the link has no goroutines.
func (*memLink) Wait() {}

// MaxHeaderLength implements stack.NetworkLinkEndpoint; there is no link
// header.
func (*memLink) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint; a point-to-point link
// has no link addresses.
func (*memLink) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (*memLink) SetLinkAddress(tcpip.LinkAddress) {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (*memLink) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.
func (*memLink) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.
func (*memLink) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint. The stack detaches before
// closing, which is all that stopping delivery needs.
func (*memLink) Close() {}

// SetOnCloseAction implements stack.NetworkLinkEndpoint; the link never
// closes by itself.
func (*memLink) SetOnCloseAction(func()) {}
