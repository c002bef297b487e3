package channels

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/internal/sockopt"
)

// CheckCongestionControl reports whether this process can give its
// sessions' TCP connections the congestion control algorithm name
// (Config.CongestionControl): the kernel must have it, and an
// unprivileged process may use only those in
// net.ipv4.tcp_allowed_congestion_control. It tries name on a socket
// that is never connected.
func CheckCongestionControl(name string) error {
	if name == "" {
		return nil
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return fmt.Errorf("congestion control %q: %w", name, os.NewSyscallError("socket", err))
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, name); err != nil {
		return congestionError(name, err)
	}
	return nil
}

// congestionError says why the kernel refused algorithm name, with the
// ones it offers.
func congestionError(name string, err error) error {
	avail := procList("/proc/sys/net/ipv4/tcp_available_congestion_control")
	switch {
	case err == unix.ENOENT || (avail != nil && !slices.Contains(avail, name)):
		return fmt.Errorf("congestion control %q is not available on this host (available: %s; one built as a module is loaded by modprobe tcp_%s)",
			name, strings.Join(avail, " "), name)
	case err == unix.EPERM:
		return fmt.Errorf("congestion control %q is not allowed for this process (allowed without CAP_NET_ADMIN: %s)", name,
			strings.Join(procList("/proc/sys/net/ipv4/tcp_allowed_congestion_control"), " "))
	}
	return fmt.Errorf("congestion control %q: %w", name, os.NewSyscallError("setsockopt TCP_CONGESTION", err))
}

// procList reads a space-separated list from a /proc file; nil if it
// cannot.
func procList(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

// setCongestion gives c, if it is a TCP connection (under the record
// batching of TLS sessions, say), the congestion control algorithm name
// (empty: leave the host's default).
func setCongestion(c net.Conn, name string) error {
	tc := sockopt.TCPConn(c)
	if name == "" || tc == nil {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := sockopt.Control(rc, func(fd int) error {
		serr = unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, name)
		return nil
	}); err != nil {
		return err
	}
	if serr != nil {
		return congestionError(name, serr)
	}
	return nil
}
