package netstack

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// SetSoftError records err as c's last (soft) error, as gVisor's TCP
// endpoint does first for an ICMP destination unreachable that concerns
// the connection, which does not end it.
func SetSoftError(c *Conn, err tcpip.Error) {
	c.ep.(interface{ UpdateLastError(tcpip.Error) }).UpdateLastError(err)
}

// EndpointState returns c's TCP state.
func EndpointState(c *Conn) tcp.EndpointState { return tcp.EndpointState(c.ep.State()) }
