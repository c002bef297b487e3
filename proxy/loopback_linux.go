package proxy

import "golang.org/x/sys/unix"

// bindAddressNoPort sets IP_BIND_ADDRESS_NO_PORT on the socket fd: its
// source port is then chosen at connect, per destination, rather than at
// bind, so many connections from one source IP do not exhaust ephemeral
// ports early.
func bindAddressNoPort(fd uintptr) error {
	return unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
}
