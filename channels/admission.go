package channels

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// admission bounds the handshakes in progress on accepted connections: in
// all (Config.MaxHandshakes) and per remote IP (Config.MaxHandshakesPerIP).
// Until its handshake ends, an accepted connection costs a goroutine, a
// file descriptor and the TLS state, for up to Config.HandshakeTimeout,
// whoever opened it; the bounds keep a host that opens connections and
// never completes them (idle, or sending a byte now and then) from
// exhausting either, or from crowding out peers at other addresses.
type admission struct {
	max, perIP int

	mu    sync.Mutex
	total int
	byIP  map[netip.Prefix]int
}

func newAdmission(max, perIP int) *admission {
	return &admission{max: max, perIP: perIP, byIP: make(map[netip.Prefix]int)}
}

// admissionKey is what the per-IP bound counts a connection from remote
// under: its IPv4 address or its IPv6 /64 (one host often holds a whole
// /64), and ok false for a peer without an IP (the same-host socket, a
// MemoryTransport connection), which counts only in the total.
func admissionKey(remote net.Addr) (key netip.Prefix, ok bool) {
	ta, isTCP := remote.(*net.TCPAddr)
	if !isTCP {
		return netip.Prefix{}, false
	}
	ip := ta.AddrPort().Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	key, err := ip.Prefix(bits)
	return key, err == nil
}

// acquire counts a handshake from remote in, or says which bound it
// would exceed. release must follow an acquire that succeeded.
func (a *admission) acquire(remote net.Addr) error {
	key, perIP := admissionKey(remote)
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.total >= a.max:
		return fmt.Errorf("%d handshakes in progress, the most this node takes at once", a.total)
	case perIP && a.byIP[key] >= a.perIP:
		return fmt.Errorf("%d handshakes in progress from %s, the most this node takes from one address at once", a.byIP[key], keyString(key))
	}
	a.total++
	if perIP {
		a.byIP[key]++
	}
	return nil
}

// release counts out a handshake from remote that acquire counted in.
func (a *admission) release(remote net.Addr) {
	key, perIP := admissionKey(remote)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.total--
	if !perIP {
		return
	}
	if a.byIP[key]--; a.byIP[key] <= 0 {
		delete(a.byIP, key)
	}
}

// keyString names an admission key: an IPv4 address, or an IPv6 /64.
func keyString(key netip.Prefix) string {
	if key.Addr().Is4() {
		return key.Addr().String()
	}
	return key.String()
}
