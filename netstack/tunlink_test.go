package netstack

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tcpproxy/tcpproxy/internal/virtio"
)

// Where the UDP and ICMP checksums are in their headers.
const (
	udpChecksumOffset  = 6
	icmpChecksumOffset = 2
)

var (
	testSrc = tcpip.AddrFrom4([4]byte{127, 0, 0, 1})
	testDst = tcpip.AddrFrom4([4]byte{127, 1, 0, 1})
)

// testPacket is an IPv4 packet of protocol proto with a transport header of
// hdrLen bytes and payload bytes after it, with valid checksums.
func testPacket(proto tcpip.TransportProtocolNumber, hdrLen, payload int) []byte {
	p := make([]byte, header.IPv4MinimumSize+hdrLen+payload)
	for i := header.IPv4MinimumSize + hdrLen; i < len(p); i++ {
		p[i] = byte(i*7 + 3)
	}
	ip := header.IPv4(p)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(p)),
		TTL:         64,
		Protocol:    uint8(proto),
		SrcAddr:     testSrc,
		DstAddr:     testDst,
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	t := p[header.IPv4MinimumSize:]
	var at int
	switch proto {
	case header.TCPProtocolNumber:
		header.TCP(t).Encode(&header.TCPFields{SrcPort: 1, DstPort: 2, DataOffset: uint8(hdrLen), Flags: header.TCPFlagAck})
		at = header.TCPChecksumOffset
	case header.UDPProtocolNumber:
		header.UDP(t).Encode(&header.UDPFields{SrcPort: 1, DstPort: 2, Length: uint16(len(t))})
		at = udpChecksumOffset
	case header.ICMPv4ProtocolNumber:
		t[0] = byte(header.ICMPv4Echo)
		at = icmpChecksumOffset
	}
	xsum := uint16(0)
	if proto != header.ICMPv4ProtocolNumber {
		xsum = header.PseudoHeaderChecksum(proto, testSrc, testDst, uint16(len(t)))
	}
	t[at], t[at+1] = 0, 0
	binary.BigEndian.PutUint16(t[at:], ^checksum.Checksum(t, xsum))
	return p
}

// split cuts p as readLoop's views do.
func split(p []byte) (head, body []byte) {
	if len(p) <= headerRoom {
		return p, nil
	}
	return p[:headerRoom], p[headerRoom:]
}

func TestDeliverableVerifiesWhatTheKernelDidNot(t *testing.T) {
	none := virtio.NetHdr{}
	partial := virtio.NetHdr{Flags: virtio.FlagNeedsCsum, CsumStart: header.IPv4MinimumSize, CsumOffset: header.TCPChecksumOffset}
	valid := virtio.NetHdr{Flags: virtio.FlagDataValid}
	corruptPayload := func(p []byte) { p[len(p)-1] ^= 0x40 }
	corruptIPHeader := func(p []byte) { p[8]-- } // TTL
	for _, c := range []struct {
		name    string
		h       virtio.NetHdr
		proto   tcpip.TransportProtocolNumber
		payload int
		corrupt func([]byte)
		want    bool
	}{
		{"no flags, good, small", none, header.TCPProtocolNumber, 10, nil, true},
		{"no flags, good, across views, odd length", none, header.TCPProtocolNumber, 60001, nil, true},
		{"no flags, bad payload", none, header.TCPProtocolNumber, 60001, corruptPayload, false},
		{"no flags, bad payload in the head", none, header.TCPProtocolNumber, 11, corruptPayload, false},
		{"no flags, bad IP header", none, header.TCPProtocolNumber, 100, corruptIPHeader, false},
		{"no flags, UDP, bad", none, header.UDPProtocolNumber, 300, corruptPayload, false},
		{"no flags, ICMP, left to the stack", none, header.ICMPv4ProtocolNumber, 300, corruptPayload, true},
		// The checksum field holds only the pseudo-header's sum: as bad
		// as a corrupt packet's, and not to be verified.
		{"needs checksum, partial", partial, header.TCPProtocolNumber, 60001, corruptPayload, true},
		{"data valid", valid, header.TCPProtocolNumber, 1000, corruptPayload, true},
		{"UDP segmentation", virtio.NetHdr{Flags: partial.Flags, GSOType: virtio.GSOUDPL4}, header.UDPProtocolNumber, 3000, nil, false},
		{"TSO burst", virtio.NetHdr{Flags: partial.Flags, GSOType: virtio.GSOTCPv4, GSOSize: 1448}, header.TCPProtocolNumber, 60000, corruptPayload, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			hdrLen := header.TCPMinimumSize
			if c.proto != header.TCPProtocolNumber {
				hdrLen = 8
			}
			p := testPacket(c.proto, hdrLen, c.payload)
			if c.corrupt != nil {
				c.corrupt(p)
			}
			head, body := split(p)
			assert.Equal(t, c.want, deliverable(&c.h, head, body))
		})
	}

	t.Run("not IPv4", func(t *testing.T) {
		p := testPacket(header.TCPProtocolNumber, header.TCPMinimumSize, 10)
		p[0] = 6<<4 | p[0]&0xf
		assert.False(t, deliverable(&valid, p, nil))
	})
}

func TestDeliverableCompletesChecksumsTheStackVerifies(t *testing.T) {
	// An ICMP packet with a partial checksum, as a NIC would get it: the
	// field holds the sum of nothing (ICMP has no pseudo-header) and the
	// link must complete it, since the stack verifies ICMP checksums.
	for _, payload := range []int{56, 3001} {
		want := testPacket(header.ICMPv4ProtocolNumber, 8, payload)
		p := append([]byte(nil), want...)
		at := header.IPv4MinimumSize + icmpChecksumOffset
		p[at], p[at+1] = 0, 0
		h := virtio.NetHdr{Flags: virtio.FlagNeedsCsum, CsumStart: header.IPv4MinimumSize, CsumOffset: icmpChecksumOffset}
		head, body := split(p)
		require.True(t, deliverable(&h, head, body))
		assert.Equal(t, want, p, "payload %d", payload)
	}
}
