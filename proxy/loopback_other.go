//go:build !linux

package proxy

// bindAddressNoPort does nothing where IP_BIND_ADDRESS_NO_PORT does not
// exist: the port is then chosen at bind.
func bindAddressNoPort(uintptr) error { return nil }
