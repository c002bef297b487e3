package netstack

import (
	"errors"
	"log/slog"
	"os"
	"sync"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tcpproxy/tcpproxy/tun"
)

// packetDevice is what tunLink needs of a *tun.Device.
type packetDevice interface {
	Read(bufs [][]byte, sizes []int, offset int) (int, error)
	Write(bufs [][]byte, offset int) (int, error)
	BatchSize() int
}

// tunLink is a stack.LinkEndpoint on a TUN device. Outbound packets are
// written to the device in the caller's goroutine, one batch per
// WritePackets call (so the device can coalesce them); one goroutine reads
// the device in batches and delivers inbound packets. It replaces
// link/channel plus a pump goroutine per direction, as in wireguard's
// tun/netstack, saving a queue hop per packet.
type tunLink struct {
	dev packetDevice
	mtu uint32
	log *slog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	started    bool
	reader     sync.WaitGroup

	bufs sync.Pool // *[]byte of tun.Offset + mtu bytes
}

var _ stack.LinkEndpoint = (*tunLink)(nil)

func newTUNLink(dev packetDevice, mtu int, log *slog.Logger) *tunLink {
	e := &tunLink{dev: dev, mtu: uint32(mtu), log: log}
	e.bufs.New = func() any {
		b := make([]byte, tun.Offset+mtu)
		return &b
	}
	return e
}

// WritePackets implements stack.LinkWriter.
func (e *tunLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	list := pkts.AsSlice()
	held := make([]*[]byte, 0, len(list))
	bufs := make([][]byte, 0, len(list))
	defer func() {
		for _, b := range held {
			e.bufs.Put(b)
		}
	}()
	for _, pkt := range list {
		size := pkt.Size()
		if size > int(e.mtu) {
			continue // the stack never builds these; drop like a NIC
		}
		bp := e.bufs.Get().(*[]byte)
		held = append(held, bp)
		b := (*bp)[:tun.Offset+size]
		off := tun.Offset
		for _, s := range pkt.AsSlices() {
			off += copy(b[off:], s)
		}
		bufs = append(bufs, b)
	}
	if len(bufs) == 0 {
		return len(list), nil
	}
	if _, err := e.dev.Write(bufs, tun.Offset); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return 0, &tcpip.ErrClosedForSend{}
		}
		// Like a NIC's transmit error: the packets are lost and TCP
		// retransmits.
		e.log.Debug("netstack: TUN write", "err", err)
	}
	return len(list), nil
}

// readLoop delivers the device's packets to the stack until the device is
// closed.
func (e *tunLink) readLoop() {
	defer e.reader.Done()
	// A read returns one packet, or the MTU-sized segments the device
	// splits a TSO burst of up to 64 KiB into: no more buffers than that
	// are ever filled.
	n := min(e.dev.BatchSize(), 65535/(int(e.mtu)-header.IPv4MinimumSize-header.TCPMinimumSize)+1)
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, tun.Offset+int(e.mtu))
	}
	sizes := make([]int, n)
	for {
		count, err := e.dev.Read(bufs, sizes, tun.Offset)
		for i := range count {
			e.deliver(bufs[i][tun.Offset : tun.Offset+sizes[i]])
		}
		switch {
		case err == nil:
		case errors.Is(err, wgtun.ErrTooManySegments):
			// Some segments of a TSO burst were lost; TCP recovers.
			e.log.Debug("netstack: TUN read", "err", err)
		case errors.Is(err, os.ErrClosed):
			return
		default:
			e.log.Error("netstack: TUN read failed; link down", "err", err)
			return
		}
	}
}

func (e *tunLink) deliver(pkt []byte) {
	if len(pkt) == 0 {
		return
	}
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return
	}
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: splitHeaders(pkt)})
	d.DeliverNetworkPacket(proto, pb)
	pb.DecRef()
}

// headerRoom covers the largest IPv4 and TCP headers (60 bytes each).
const headerRoom = 128

// splitHeaders copies pkt into a Buffer whose first view holds the headers
// and whose second holds the payload. The IP layer keeps a reference to
// the header's view while it parses the packet, which makes the view's
// chunk shared, and a shared chunk is copied whole the next time a header
// is read from it: with one view, that is a copy of up to 64 KiB per
// packet; with two, of 128 bytes.
func splitHeaders(pkt []byte) buffer.Buffer {
	if len(pkt) <= headerRoom {
		return buffer.MakeWithData(pkt)
	}
	b := buffer.MakeWithData(pkt[:headerRoom])
	b.Append(buffer.NewViewWithData(pkt[headerRoom:]))
	return b
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

// Capabilities implements stack.NetworkLinkEndpoint. Packets from the
// kernel carry valid checksums: the device completes partial ones
// (CHECKSUM_PARTIAL, TSO) before Read returns them.
func (*tunLink) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

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
