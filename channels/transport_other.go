//go:build !linux

package channels

import (
	"errors"
	"net"
)

// sameHostSupported: without abstract Unix socket names a same-host
// socket would need a file, with its permissions and clean-up; sessions
// use TCP instead.
const sameHostSupported = false

func checkSameHostPeer(net.Conn) error {
	return errors.New("same-host sockets are not supported on this platform")
}

func growSendBuffer(net.Conn, bool) error {
	return errors.New("same-host sockets are not supported on this platform")
}
