package netstack_test

import (
	"context"
	"fmt"
	"io"
	"net/netip"

	"github.com/tcpproxy/tcpproxy/netstack"
)

// A memory network joins the proxy's gVisor stack to a second stack that
// stands in for the host. A program on the host connects to a synthetic
// address that nothing on the host owns; the proxy's side accepts it,
// whatever the IP, and sees the host's address as the caller.
func ExampleNewMemory() {
	ctx := context.Background()
	network, host, err := netstack.NewMemory(netstack.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer host.Close()
	defer network.Close()

	// The proxy claims a member's instance address, as a duplex
	// "impostor" listener does.
	member := netip.MustParseAddrPort("127.0.5.5:6379")
	ln, err := network.Listen(ctx, member)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		caller := netip.MustParseAddrPort(c.RemoteAddr().String()).Addr()
		fmt.Fprintf(c, "hello from %v to %v", c.LocalAddr(), caller)
		_ = c.(*netstack.Conn).CloseWrite() // a FIN: the caller reads io.EOF
	}()

	c, err := host.Dial(ctx, member)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	got, err := io.ReadAll(c)
	fmt.Printf("%q %v\n", got, err)
	// Output: "hello from 127.0.5.5:6379 to 127.0.0.1" <nil>
}
