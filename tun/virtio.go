package tun

import "encoding/binary"

// VirtioNetHdrLen is the size of the virtio-net header (struct
// virtio_net_hdr of linux/virtio_net.h) that precedes every packet in the
// frames of Device.ReadFrame and Device.WriteFrame.
const VirtioNetHdrLen = 10

// Values of VirtioNetHdr.Flags.
const (
	// VirtioNetHdrFNeedsCsum (VIRTIO_NET_HDR_F_NEEDS_CSUM) marks a packet
	// whose transport checksum is partial (CHECKSUM_PARTIAL in the kernel):
	// the field at CsumStart+CsumOffset holds the pseudo-header checksum
	// and the checksum of the bytes from CsumStart on is yet to be added.
	VirtioNetHdrFNeedsCsum = 1
	// VirtioNetHdrFDataValid (VIRTIO_NET_HDR_F_DATA_VALID) marks a packet
	// whose checksums the kernel has verified (CHECKSUM_UNNECESSARY).
	VirtioNetHdrFDataValid = 2
)

// Values of VirtioNetHdr.GSOType.
const (
	VirtioNetHdrGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE: one packet
	VirtioNetHdrGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4: TSO burst
	VirtioNetHdrGSOUDP   = 3    // VIRTIO_NET_HDR_GSO_UDP
	VirtioNetHdrGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	VirtioNetHdrGSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4
	VirtioNetHdrGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN, or'ed in
)

// VirtioNetHdr is struct virtio_net_hdr. The TUN device uses it in the
// host's byte order (legacy virtio; the device is never switched with
// TUNSETVNETLE or TUNSETVNETBE). On a TUN device (no link-layer header)
// CsumStart counts from the start of the IP header, so it is the IP
// header's length.
type VirtioNetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16 // length of the IP and transport headers (a hint)
	GSOSize    uint16 // payload bytes per segment of a GSO packet
	CsumStart  uint16
	CsumOffset uint16
}

// Decode fills h from the first VirtioNetHdrLen bytes of b.
func (h *VirtioNetHdr) Decode(b []byte) {
	_ = b[VirtioNetHdrLen-1]
	h.Flags = b[0]
	h.GSOType = b[1]
	h.HdrLen = binary.NativeEndian.Uint16(b[2:])
	h.GSOSize = binary.NativeEndian.Uint16(b[4:])
	h.CsumStart = binary.NativeEndian.Uint16(b[6:])
	h.CsumOffset = binary.NativeEndian.Uint16(b[8:])
}

// Encode writes h to the first VirtioNetHdrLen bytes of b.
func (h *VirtioNetHdr) Encode(b []byte) {
	_ = b[VirtioNetHdrLen-1]
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.NativeEndian.PutUint16(b[2:], h.HdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.GSOSize)
	binary.NativeEndian.PutUint16(b[6:], h.CsumStart)
	binary.NativeEndian.PutUint16(b[8:], h.CsumOffset)
}
