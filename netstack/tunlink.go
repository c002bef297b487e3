package netstack

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"math"
	"os"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tcpproxy/tcpproxy/internal/virtio"
)

// frameDevice is what tunLink needs of a *tun.Device.
type frameDevice interface {
	ReadFrame(bufs [][]byte) (int, error)
	WriteFrame(bufs [][]byte) error
}

// tunLink is a stack.LinkEndpoint on a TUN device opened with virtio-net
// headers and the kernel's checksum and TSO offloads. Outbound packets are
// written to the device in the caller's goroutine, one writev per packet
// straight from gVisor's buffers; one goroutine reads the device and
// delivers inbound packets, read straight into gVisor's buffers. It
// replaces link/channel plus a pump goroutine per direction, as in
// wireguard's tun/netstack, saving a queue hop per packet.
//
// Checksums are offloaded both ways, as between a virtio NIC and its host:
//
//   - Outbound, the link offers host GSO (SupportedGSO), so gVisor's TCP
//     puts only the pseudo-header checksum in its segments and may build
//     segments of up to 64 KiB whatever the MTU; the link marks them
//     VIRTIO_NET_HDR_F_NEEDS_CSUM (and with a GSO type when larger than the
//     MSS), and the kernel treats them as CHECKSUM_PARTIAL: a locally
//     delivered one is never checksummed at all. Packets gVisor sends
//     without GSO options (ICMP, RSTs of the stack itself) carry full
//     checksums, and go out with a zero header.
//   - Inbound, the link declares CapabilityRXChecksumOffload, so gVisor
//     verifies neither IPv4 header nor TCP checksums, and the link vouches
//     for them: see deliverable.
type tunLink struct {
	dev frameDevice
	mtu uint32
	log *slog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	started    bool
	reader     sync.WaitGroup
}

var (
	_ stack.LinkEndpoint = (*tunLink)(nil)
	_ stack.GSOEndpoint  = (*tunLink)(nil)
)

func newTUNLink(dev frameDevice, mtu int, log *slog.Logger) *tunLink {
	return &tunLink{dev: dev, mtu: uint32(mtu), log: log}
}

// WritePackets implements stack.LinkWriter.
func (e *tunLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	var vnet [virtio.NetHdrLen]byte
	iovs := make([][]byte, 0, 8)
	list := pkts.AsSlice()
	for i, pkt := range list {
		if pkt.GSOOptions.Type == stack.GSONone && pkt.Size() > int(e.mtu) {
			continue // the stack never builds these; drop like a NIC
		}
		h := virtioNetHdr(pkt)
		h.Encode(vnet[:])
		iovs = append(iovs[:0], vnet[:])
		views, off := pkt.AsViewList()
		for v := views.Front(); v != nil; v = v.Next() {
			b := v.AsSlice()
			if off >= len(b) {
				off -= len(b)
				continue
			}
			iovs = append(iovs, b[off:])
			off = 0
		}
		if err := e.dev.WriteFrame(iovs); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return i, &tcpip.ErrClosedForSend{}
			}
			// Like a NIC's transmit error: the packet is lost and TCP
			// retransmits.
			e.log.Debug("netstack: TUN write", "err", err)
		}
	}
	return len(list), nil
}

// virtioNetHdr is the header that tells the kernel about pkt's offloads.
func virtioNetHdr(pkt *stack.PacketBuffer) virtio.NetHdr {
	gso := pkt.GSOOptions
	if gso.Type == stack.GSONone {
		return virtio.NetHdr{} // checksums complete
	}
	h := virtio.NetHdr{HdrLen: uint16(pkt.HeaderSize())}
	if gso.NeedsCsum {
		// The TCP checksum field holds the pseudo-header checksum
		// (tcp.buildTCPHdr), as the kernel expects of CHECKSUM_PARTIAL.
		// CsumStart counts from the IP header, which may have options:
		// the header's own length, not gso.L3HdrLen.
		h.Flags = virtio.FlagNeedsCsum
		h.CsumStart = uint16(len(pkt.NetworkHeader().Slice()))
		h.CsumOffset = gso.CsumOffset
	}
	if gso.MSS > 0 && pkt.Data().Size() > int(gso.MSS) {
		switch gso.Type {
		case stack.GSOTCPv4:
			h.GSOType = virtio.GSOTCPv4
		case stack.GSOTCPv6:
			h.GSOType = virtio.GSOTCPv6
		}
		h.GSOSize = gso.MSS
	}
	return h
}

// headerRoom covers the largest IPv4 and TCP headers (60 bytes each).
const headerRoom = 128

// readLoop delivers the device's packets to the stack until the device is
// closed.
//
// Each frame is read into two views, which become the packet's Buffer
// without a copy: the first, of headerRoom bytes, holds the headers and the
// second the rest. The IP layer keeps a reference to the header's view
// while it parses the packet, which makes the view's chunk shared, and a
// shared chunk is copied whole the next time a header is read from it:
// with one view, that is a copy of up to 64 KiB per packet; with two, of
// 128 bytes.
func (e *tunLink) readLoop() {
	defer e.reader.Done()
	var vnet [virtio.NetHdrLen]byte
	var head, body *buffer.View
	defer func() {
		for _, v := range []*buffer.View{head, body} {
			if v != nil {
				v.Release()
			}
		}
	}()
	iovs := [][]byte{vnet[:], nil, nil}
	for {
		if head == nil {
			head = buffer.NewViewSize(headerRoom)
			iovs[1] = head.AsSlice()
		}
		if body == nil {
			// With head, more than the largest IPv4 packet (a TSO burst
			// included). The kernel cuts a longer frame to the buffers
			// but returns its whole length, which the size check below
			// rejects.
			body = buffer.NewViewSize(buffer.MaxChunkSize)
			iovs[2] = body.AsSlice()
		}
		n, err := e.dev.ReadFrame(iovs)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrClosed):
			return
		default:
			e.log.Error("netstack: TUN read failed; link down", "err", err)
			return
		}
		size := n - virtio.NetHdrLen
		if size <= 0 || size > math.MaxUint16 { // an IPv4 packet's largest
			continue
		}
		var h virtio.NetHdr
		h.Decode(vnet[:])
		hb, bb := iovs[1][:min(size, headerRoom)], iovs[2][:max(size-headerRoom, 0)]
		if !deliverable(&h, hb, bb) {
			e.log.Debug("netstack: TUN packet dropped", "flags", h.Flags, "gso", h.GSOType, "size", size)
			continue
		}
		// The Buffer takes head; it takes body only if the packet fills at
		// least half of it, else it gets a copy of the payload in a view
		// of its size, and body is read into again: the queues of gVisor's
		// TCP account for payload bytes, not for the chunks behind them,
		// so small packets must not pin 64 KiB each.
		head.CapLength(len(hb))
		b := buffer.MakeWithView(head)
		head = nil
		switch {
		case len(bb) == 0:
		case len(bb) < buffer.MaxChunkSize/2:
			b.Append(buffer.NewViewWithData(bb))
		default:
			body.CapLength(len(bb))
			b.Append(body)
			body = nil
		}
		e.deliver(b)
	}
}

// deliverable reports whether the stack may take the packet whose frame
// has header h, and whose first bytes are head and the rest body. It
// vouches for the checksums that the stack, under
// CapabilityRXChecksumOffload, does not verify:
//
//   - A packet with VIRTIO_NET_HDR_F_NEEDS_CSUM (CHECKSUM_PARTIAL) was
//     built by a kernel socket of this machine (of this namespace, or of
//     one joined to it by a veth; or by a VM behind a virtio NIC) and
//     has crossed no wire or NIC since: one that had would carry a
//     complete checksum. Its transport checksum was never computed (the
//     field holds only the pseudo-header's sum), so there is nothing to
//     verify: its bytes went from the sender's buffer to this read
//     through memory only, and Linux trusts such packets the same way.
//     Completing the checksum would cost a pass over up to 64 KiB per
//     packet for a stack that does not look at it. For protocols whose
//     checksum the stack does verify (ICMP), it is completed instead.
//   - One with VIRTIO_NET_HDR_F_DATA_VALID the kernel has verified.
//   - Any other (CHECKSUM_NONE: forwarded from another interface, or sent
//     on a raw socket) may carry a bad checksum, and is verified here.
//
// A TSO burst (GSO type TCPv4) is delivered whole, as Linux's GRO would
// merge it: the IP header's length covers all of it and gVisor's TCP takes
// segments larger than the MSS. Only IPv4 is delivered: the stack speaks
// nothing else.
func deliverable(h *virtio.NetHdr, head, body []byte) bool {
	if len(head) < header.IPv4MinimumSize || header.IPVersion(head) != header.IPv4Version {
		return false
	}
	switch h.GSOType &^ virtio.GSOECN {
	case virtio.GSONone, virtio.GSOTCPv4:
	default:
		return false // UDP segmentation: the stack has no UDP
	}
	proto := header.IPv4(head).TransportProtocol()
	switch {
	case h.Flags&virtio.FlagNeedsCsum != 0:
		if proto == header.TCPProtocolNumber || proto == header.UDPProtocolNumber {
			return true
		}
		return completeChecksum(int(h.CsumStart), int(h.CsumOffset), head, body)
	case h.Flags&virtio.FlagDataValid != 0:
		return true
	}
	return checksumsValid(head, body)
}

// completeChecksum completes a partial checksum (CHECKSUM_PARTIAL) as a NIC
// would: the sum of the bytes from start on goes into the field at
// start+offset, which holds the pseudo-header's sum. start must be even.
func completeChecksum(start, offset int, head, body []byte) bool {
	at := start + offset
	if start%2 != 0 || at+2 > len(head) {
		return false
	}
	initial := binary.BigEndian.Uint16(head[at:])
	head[at], head[at+1] = 0, 0
	binary.BigEndian.PutUint16(head[at:], ^sum(head, body, start, len(head)+len(body), initial))
	return true
}

// checksumsValid verifies the IPv4 header checksum and the TCP or UDP
// checksum of a packet. Other transports' the stack verifies itself. A
// fragment's transport checksum covers the whole datagram and is not
// verified.
func checksumsValid(head, body []byte) bool {
	ip := header.IPv4(head)
	ihl := int(ip.HeaderLength())
	if ihl < header.IPv4MinimumSize || ihl > len(head) || !ip.IsChecksumValid() {
		return false
	}
	total := int(ip.TotalLength())
	if total < ihl || total > len(head)+len(body) {
		return false
	}
	if ip.More() || ip.FragmentOffset() != 0 {
		return true
	}
	proto := ip.TransportProtocol()
	switch proto {
	case header.TCPProtocolNumber:
	case header.UDPProtocolNumber:
		if total >= ihl+header.UDPMinimumSize && header.UDP(head[ihl:]).Checksum() == 0 {
			return true // sent without a checksum
		}
	default:
		return true
	}
	xsum := header.PseudoHeaderChecksum(proto, ip.SourceAddress(), ip.DestinationAddress(), uint16(total-ihl))
	return sum(head, body, ihl, total, xsum) == 0xffff
}

// sum is the ones' complement sum, from initial, of bytes [from, to) of
// the packet whose first bytes are head and the rest body. from must be
// even, and so is len(head) unless body is empty: a chunk of odd length
// would misalign the next.
func sum(head, body []byte, from, to int, initial uint16) uint16 {
	if from < len(head) {
		end := min(to, len(head))
		initial = checksum.Checksum(head[from:end], initial)
		from = end
	}
	if from < to {
		initial = checksum.Checksum(body[from-len(head):to-len(head)], initial)
	}
	return initial
}

// deliver hands b, an IPv4 packet, to the stack, which takes it over.
func (e *tunLink) deliver(b buffer.Buffer) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		b.Release()
		return
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: b})
	d.DeliverNetworkPacket(header.IPv4ProtocolNumber, pb)
	pb.DecRef()
}

// Attach implements stack.NetworkLinkEndpoint; the first attach starts the
// reader.
func (e *tunLink) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
	if d != nil && !e.started {
		e.started = true
		e.reader.Add(1)
		go e.readLoop()
	}
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (e *tunLink) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.NetworkLinkEndpoint. It does not wait for the
// reader, which ends only when the device is closed, after the stack's
// Wait: see waitReader.
func (*tunLink) Wait() {}

// waitReader waits for the reader goroutine to end; the device must be
// closed.
func (e *tunLink) waitReader() { e.reader.Wait() }

// MTU implements stack.NetworkLinkEndpoint.
func (e *tunLink) MTU() uint32 { return e.mtu }

// SetMTU implements stack.NetworkLinkEndpoint; the device's MTU is fixed.
func (*tunLink) SetMTU(uint32) {}

// Capabilities implements stack.NetworkLinkEndpoint. The link vouches for
// the checksums of the packets it delivers: see deliverable.
func (*tunLink) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// SupportedGSO implements stack.GSOEndpoint: the kernel segments (or, for
// its own sockets, simply takes) TCP segments larger than the MTU and
// computes their checksums.
func (*tunLink) SupportedGSO() stack.SupportedGSO { return stack.HostGSOSupported }

// GSOMaxSize implements stack.GSOEndpoint. gVisor's TCP keeps segments
// TCPTotalHeaderMaximumSize+1 bytes below it, so that with IP and TCP
// headers a segment stays within an IPv4 packet's 64 KiB.
func (*tunLink) GSOMaxSize() uint32 { return stack.GVisorGSOMaxSize }

// MaxHeaderLength implements stack.NetworkLinkEndpoint; TUN packets are
// bare IP.
func (*tunLink) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint.
func (*tunLink) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (*tunLink) SetLinkAddress(tcpip.LinkAddress) {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (*tunLink) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.
func (*tunLink) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.
func (*tunLink) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint. The Network closes the
// device itself, after the stack.
func (*tunLink) Close() {}

// SetOnCloseAction implements stack.NetworkLinkEndpoint.
func (*tunLink) SetOnCloseAction(func()) {}
