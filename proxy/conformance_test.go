package proxy_test

import (
	"testing"

	"github.com/tcpproxy/tcpproxy/proxy/proxytest"
)

func TestConformanceLoopback(t *testing.T) {
	proxytest.Run(t, proxytest.LoopbackInstance)
}
