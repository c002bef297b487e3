package tun

import "errors"

// ErrUnavailable reports that this process cannot create a TUN device or
// route into it. Errors wrapping it carry the cause.
var ErrUnavailable = errors.New("kernel TUN unavailable: it needs /dev/net/tun and CAP_NET_ADMIN (a privileged container); use network: loopback otherwise")

// ErrInUse is matched by the error of Cleanup when a process still holds
// the device open: a running instance, whose network a cleanup would break.
var ErrInUse = errors.New("the device is open: an instance is running on it; stop it (it removes its routing as it exits) or force the cleanup")
