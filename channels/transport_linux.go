package channels

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// sameHostSupported: Linux has abstract Unix socket names, which need no
// file and vanish with their process.
const sameHostSupported = true

// errUntrustedPeer is returned for a same-host socket whose owner runs as
// neither this process's user nor root.
var errUntrustedPeer = errors.New("same-host socket owned by another user")

// checkSameHostPeer accepts c's peer if it runs as this process's
// effective user or as root (SO_PEERCRED, recorded by the kernel when the
// peer listened).
func checkSameHostPeer(c net.Conn) error {
	rc, err := rawConnOf(c)
	if err != nil {
		return err
	}
	var (
		cred *unix.Ucred
		cerr error
	)
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return os.NewSyscallError("getsockopt SO_PEERCRED", cerr)
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("%w (uid %d, pid %d)", errUntrustedPeer, cred.Uid, cred.Pid)
	}
	return nil
}

// sameHostSendBuffer is the send buffer asked for on a same-host socket.
// Unix stream sockets do not grow their buffers as loopback TCP does (to
// net.ipv4.tcp_wmem's 4 MiB), and a sender may have only its send buffer
// queued at the receiver: at the default 208 KiB it stops and is woken
// five times per 1 MiB frame, and the shortcut is slower than TCP.
const sameHostSendBuffer = 4 << 20

// sameHostMinSendBuffer is the least send buffer a dialer takes the
// shortcut with: what a process without CAP_NET_ADMIN gets where
// net.core.wmem_max is at its usual default (208 KiB) is less. (A
// variable for tests.)
var sameHostMinSendBuffer = 1 << 20

// errSmallSendBuffer is returned for a same-host socket whose send buffer
// cannot be grown to sameHostMinSendBuffer.
var errSmallSendBuffer = errors.New("same-host socket: send buffer too small")

// growSendBuffer asks for a sameHostSendBuffer send buffer on c: beyond
// net.core.wmem_max if the process may (SO_SNDBUFFORCE), else up to it.
// With need set, a buffer left below sameHostMinSendBuffer is an error.
func growSendBuffer(c net.Conn, need bool) error {
	rc, err := rawConnOf(c)
	if err != nil {
		return err
	}
	var (
		got  int
		gerr error
	)
	if err := rc.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sameHostSendBuffer) != nil {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, sameHostSendBuffer)
		}
		// The kernel reports twice the size asked for, the
		// bookkeeping overhead it allows.
		got, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
		got /= 2
	}); err != nil {
		return err
	}
	if gerr != nil {
		return os.NewSyscallError("getsockopt SO_SNDBUF", gerr)
	}
	if need && got < sameHostMinSendBuffer {
		return fmt.Errorf("%w: %d bytes (raise net.core.wmem_max to %d)", errSmallSendBuffer, got, sameHostSendBuffer)
	}
	return nil
}

// rawConnOf returns the RawConn of the Unix socket c.
func rawConnOf(c net.Conn) (syscall.RawConn, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("same-host socket: unexpected %T", c)
	}
	return uc.SyscallConn()
}
