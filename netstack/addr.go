package netstack

import (
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// nicID is the only NIC of every stack this package builds.
const nicID tcpip.NICID = 1

func tcpipAddr(a netip.Addr) tcpip.Address {
	return tcpip.AddrFrom4(a.As4())
}

func netipAddr(a tcpip.Address) netip.Addr {
	return netip.AddrFrom4(a.As4())
}

func fullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(ap.Addr()), Port: ap.Port()}
}

func subnet(p netip.Prefix) tcpip.Subnet {
	return tcpip.AddressWithPrefix{Address: tcpipAddr(p.Masked().Addr()), PrefixLen: p.Bits()}.Subnet()
}

func tcpAddr(ap netip.AddrPort) *net.TCPAddr {
	return net.TCPAddrFromAddrPort(ap)
}
