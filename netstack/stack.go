package netstack

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// newStack builds an IPv4+TCP stack with one NIC on link, tuned for bulk
// transfer. handleLocal makes the stack deliver packets for its own
// addresses internally (the host side); the proxy side sends everything to
// the link.
func newStack(o Options, link stack.LinkEndpoint, handleLocal bool) (*stack.Stack, error) {
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocolWithOptions(ipv4.Options{
			// Every synthetic address is in 127.0.0.0/8, which gVisor,
			// like Linux without route_localnet, drops as martian on a
			// non-loopback NIC.
			AllowExternalLoopbackTraffic: true,
		})},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		HandleLocal:        handleLocal,
	})
	if err := tuneTCP(s, o.MaxBufferSize); err != nil {
		s.Destroy()
		return nil, err
	}
	if err := s.CreateNIC(nicID, link); err != nil {
		s.Destroy()
		return nil, fmt.Errorf("netstack: create NIC: %s", err)
	}
	return s, nil
}

// tuneTCP raises gVisor's TCP defaults, which are sized for a sandboxed
// application rather than a proxy moving bulk data.
func tuneTCP(s *stack.Stack, maxBuf int) error {
	def := min(tcp.DefaultReceiveBufferSize, maxBuf)
	opts := []tcpip.SettableTransportProtocolOption{
		// SACK recovers from loss without resending whole windows; off by
		// default in gVisor.
		new(tcpip.TCPSACKEnabled(true)),
		// Receive buffers start at 1 MiB and grow with the measured
		// bandwidth-delay product up to maxBuf.
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: def, Max: maxBuf},
		new(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: maxBuf / 2, Max: maxBuf},
		// CUBIC, as on Linux; gVisor defaults to Reno.
		new(tcpip.CongestionControlOption("cubic")),
	}
	for _, opt := range opts {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("netstack: set TCP option %T: %s", opt, err)
		}
	}
	return nil
}
