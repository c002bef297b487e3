package sockopt_test

import (
	"crypto/tls"
	"fmt"
	"net"

	"github.com/tcpproxy/tcpproxy/internal/sockopt"
)

// TCPConn finds the TCP connection under a TLS client, whose socket a
// caller can then tune.
func ExampleTCPConn() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer raw.Close()
	c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
	fmt.Println(sockopt.TCPConn(c) == raw)
	// Output: true
}
