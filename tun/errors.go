package tun

import "errors"

// ErrUnavailable reports that this process cannot create a TUN device or
// route into it. Errors wrapping it carry the cause.
var ErrUnavailable = errors.New("kernel TUN unavailable: it needs /dev/net/tun and CAP_NET_ADMIN (a privileged container); use network: loopback otherwise")
