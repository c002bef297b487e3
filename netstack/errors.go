package netstack

import (
	"errors"
	"os"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// errnos pairs the tcpip errors a TCP connection can report with the errno
// a Linux socket reports in the same situation, so callers can test errors
// with errors.Is(err, syscall.ECONNRESET) whichever Network made the conn.
var errnos = []struct {
	err   tcpip.Error
	errno syscall.Errno
}{
	{&tcpip.ErrConnectionReset{}, syscall.ECONNRESET},
	{&tcpip.ErrConnectionRefused{}, syscall.ECONNREFUSED},
	{&tcpip.ErrConnectionAborted{}, syscall.ECONNABORTED},
	{&tcpip.ErrAborted{}, syscall.ECONNABORTED},
	{&tcpip.ErrClosedForSend{}, syscall.EPIPE},
	{&tcpip.ErrTimeout{}, syscall.ETIMEDOUT},
	{&tcpip.ErrNetworkUnreachable{}, syscall.ENETUNREACH},
	{&tcpip.ErrHostUnreachable{}, syscall.EHOSTUNREACH},
	{&tcpip.ErrHostDown{}, syscall.EHOSTDOWN},
	{&tcpip.ErrNotConnected{}, syscall.ENOTCONN},
	{&tcpip.ErrPortInUse{}, syscall.EADDRINUSE},
	{&tcpip.ErrBadLocalAddress{}, syscall.EADDRNOTAVAIL},
	{&tcpip.ErrNoPortAvailable{}, syscall.EAGAIN},
	{&tcpip.ErrInvalidEndpointState{}, syscall.EINVAL},
}

// errnoByMessage maps the messages of the errors above to their errnos:
// gonet flattens tcpip errors into errors.New(err.String()).
var errnoByMessage = func() map[string]syscall.Errno {
	m := make(map[string]syscall.Errno, len(errnos))
	for _, e := range errnos {
		m[e.err.String()] = e.errno
	}
	return m
}()

// sysErr converts a tcpip error into the *os.SyscallError a Linux socket
// call named syscallName would have returned.
func sysErr(syscallName string, err tcpip.Error) error {
	if errno, ok := errnoByMessage[err.String()]; ok {
		return os.NewSyscallError(syscallName, errno)
	}
	return errors.New(err.String())
}
