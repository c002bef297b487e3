//go:build !linux

package channels

import (
	"errors"
	"net"
)

// CheckCongestionControl reports whether sessions can use the congestion
// control algorithm name: on this platform only the default ("").
func CheckCongestionControl(name string) error {
	if name == "" {
		return nil
	}
	return errors.New("choosing the congestion control algorithm is supported on Linux only")
}

func setCongestion(net.Conn, string) error { return nil }
