package membership

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
)

// ValidateMember checks what every source requires of a member: an iid
// and a role that fit the wire format, an addr that is host:port with a
// port 1-65535, and channel names and ports that fit the wire format. With
// needAddr false a member may have no addr: one that is never dialed, such
// as an embedded client that does not listen, listed so that its sessions
// are accepted.
func ValidateMember(m channels.Member, needAddr bool) error {
	at := "member"
	if m.IID != "" {
		at = fmt.Sprintf("member %q", m.IID)
	}
	switch {
	case m.IID == "":
		return fmt.Errorf("%s: missing iid", at)
	case len(m.IID) > maxNameLen:
		return fmt.Errorf("%s: iid length %d exceeds %d", at, len(m.IID), maxNameLen)
	case len(m.Role) > maxNameLen:
		return fmt.Errorf("%s: role length %d exceeds %d", at, len(m.Role), maxNameLen)
	case m.Addr == "" && needAddr:
		return fmt.Errorf("%s: missing addr", at)
	}
	if m.Addr != "" {
		_, port, err := net.SplitHostPort(m.Addr)
		if err != nil {
			return fmt.Errorf("%s: addr %q is not host:port: %w", at, m.Addr, err)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			return fmt.Errorf("%s: addr %q: port must be 1-65535", at, m.Addr)
		}
	}
	for name, port := range m.Channels {
		switch {
		case name == "":
			return fmt.Errorf("%s: empty channel name", at)
		case len(name) > maxNameLen:
			return fmt.Errorf("%s: channel name length %d exceeds %d", at, len(name), maxNameLen)
		case port == 0:
			return fmt.Errorf("%s: channel %q: port must be 1-65535", at, name)
		}
	}
	return nil
}

// backoff is a doubling retry delay with jitter, for reconnecting to a
// registry. The zero value starts at backoffMin.
type backoff struct{ d time.Duration }

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 5 * time.Second
)

// next returns the delay before the next attempt.
func (b *backoff) next() time.Duration {
	b.d = min(max(2*b.d, backoffMin), backoffMax)
	// Up to 25% less, so that many proxies restarted together spread out.
	return b.d - rand.N(b.d/4+1)
}

// reset starts over after a success.
func (b *backoff) reset() { b.d = 0 }

// sleep waits d or until ctx ends; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
