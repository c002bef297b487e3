package netstack_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// Network must satisfy the proxy's contract without importing it.
var _ proxy.Network = (*netstack.Network)(nil)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
