// Package virtio is the virtio-net header (struct virtio_net_hdr of
// linux/virtio_net.h) that a TUN device opened with IFF_VNET_HDR puts in
// front of every packet: package tun reads and writes frames with it, and
// package netstack turns it into gVisor's GSO and checksum state.
package virtio

import "encoding/binary"

// NetHdrLen is the size of the virtio-net header (struct
// virtio_net_hdr of linux/virtio_net.h) that precedes every packet in the
// frames of tun.Device.ReadFrame and tun.Device.WriteFrame.
const NetHdrLen = 10

// Values of NetHdr.Flags.
const (
	// FlagNeedsCsum (VIRTIO_NET_HDR_F_NEEDS_CSUM) marks a packet
	// whose transport checksum is partial (CHECKSUM_PARTIAL in the kernel):
	// the field at CsumStart+CsumOffset holds the pseudo-header checksum
	// and the checksum of the bytes from CsumStart on is yet to be added.
	FlagNeedsCsum = 1
	// FlagDataValid (VIRTIO_NET_HDR_F_DATA_VALID) marks a packet
	// whose checksums the kernel has verified (CHECKSUM_UNNECESSARY).
	FlagDataValid = 2
)

// Values of NetHdr.GSOType.
const (
	GSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE: one packet
	GSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4: TSO burst
	GSOUDP   = 3    // VIRTIO_NET_HDR_GSO_UDP
	GSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	GSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4
	GSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN, or'ed in
)

// NetHdr is struct virtio_net_hdr. The TUN device uses it in the
// host's byte order (legacy virtio; the device is never switched with
// TUNSETVNETLE or TUNSETVNETBE). On a TUN device (no link-layer header)
// CsumStart counts from the start of the IP header, so it is the IP
// header's length.
type NetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16 // length of the IP and transport headers (a hint)
	GSOSize    uint16 // payload bytes per segment of a GSO packet
	CsumStart  uint16
	CsumOffset uint16
}

// Decode fills h from the first NetHdrLen bytes of b.
func (h *NetHdr) Decode(b []byte) {
	_ = b[NetHdrLen-1]
	h.Flags = b[0]
	h.GSOType = b[1]
	h.HdrLen = binary.NativeEndian.Uint16(b[2:])
	h.GSOSize = binary.NativeEndian.Uint16(b[4:])
	h.CsumStart = binary.NativeEndian.Uint16(b[6:])
	h.CsumOffset = binary.NativeEndian.Uint16(b[8:])
}

// Encode writes h to the first NetHdrLen bytes of b.
func (h *NetHdr) Encode(b []byte) {
	_ = b[NetHdrLen-1]
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.NativeEndian.PutUint16(b[2:], h.HdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.GSOSize)
	binary.NativeEndian.PutUint16(b[6:], h.CsumStart)
	binary.NativeEndian.PutUint16(b[8:], h.CsumOffset)
}
