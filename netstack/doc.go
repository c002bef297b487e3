// Package netstack runs the legacy side of tcpproxy inside a gVisor
// userspace TCP/IP stack (gvisor.dev/gvisor/pkg/tcpip).
//
// A Network is the proxy's side of that stack and satisfies proxy.Network:
//
//   - Listen claims a synthetic address:port, whatever the IP: the NIC is
//     promiscuous, so no address has to be added to the stack, and every
//     SYN to an address:port nobody claimed is refused with RST.
//   - Dial originates connections from any source IP (the NIC spoofs), so
//     the legacy server sees the calling instance's IP.
//
// The stack's link is either the kernel TUN device of package tun (NewTUN:
// an unmodified program on the host reaches the synthetic addresses through
// the kernel's routing) or an in-memory link to a second gVisor stack
// (NewMemory: a Host where tests run their "legacy" programs hermetically,
// without root or the kernel).
//
// Connections are *Conn: like *net.TCPConn they support CloseWrite
// (half-close), SetLinger(0) + Close (reset) and report errors that match
// syscall errnos with errors.Is (ECONNRESET, ECONNREFUSED, ...).
//
// Only IPv4 is supported: every synthetic range is in 127.0.0.0/8.
package netstack
