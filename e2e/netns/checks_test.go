//go:build linux

package netns

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tcpproxy/tcpproxy/e2e/internal/legacy"
)

// integrity is what checkIntegrity found.
type integrity struct {
	Clients, Servers legacy.Summary
	// Lost counts client connections reported OK whose server side did not
	// verify every byte: always zero, or the test fails.
	Lost int
	// ServerOnly counts connections whose server received and verified
	// everything but whose client failed afterwards (the answer was lost
	// with the connection): failed, not delivered, and never silent.
	ServerOnly int
	// Truncated counts sides that saw a clean end (FIN) before all the
	// data, on hosts whose proxy was alive: a reset turned into an EOF.
	Truncated int
	// Anonymous counts server sides that ended before the client's hello.
	Anonymous int
}

func (in integrity) String() string {
	return fmt.Sprintf("clients: %v; servers: %v; lost=%d truncated=%d server-only=%d anonymous=%d",
		in.Clients, in.Servers, in.Lost, in.Truncated, in.ServerOnly, in.Anonymous)
}

// checkIntegrity asserts what must hold whatever the faults:
//   - no side saw corrupt data, and no side hung past its bound;
//   - a client that reports OK has a server side that verified exactly
//     the bytes the client sent (nothing silently lost);
//   - a clean end before all the data (a FIN where a reset was due) is
//     seen only by legacy programs on a host whose proxy was killed while
//     the connection lived: there the kernel, not the proxy, closes the
//     sockets;
//   - each connection has at most one server side.
func (c *cluster) checkIntegrity(t *testing.T) integrity {
	t.Helper()
	clients, servers := c.clients.Records(), c.servers.Records()
	in := integrity{Clients: legacy.Summarize(clients), Servers: legacy.Summarize(servers)}
	byID := make(map[uint64]legacy.Record)
	var problems []string
	report := func(format string, args ...any) {
		if len(problems) < 30 {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
	}
	for _, r := range servers {
		if r.ID == 0 {
			in.Anonymous++
			continue
		}
		if prev, dup := byID[r.ID]; dup {
			report("two server sides for one connection:\n  %v\n  %v", prev, r)
		}
		byID[r.ID] = r
	}
	for _, r := range append(clients, servers...) {
		switch r.Outcome {
		case legacy.Corrupt:
			report("CORRUPT: %v", r)
		case legacy.Timeout:
			report("HANG (bound passed): %v", r)
		case legacy.ShortEOF:
			// A killed proxy's legacy connections end with RST
			// (proxy.armReset), but one it accepted or dialed in the
			// instant before the kill, not yet armed, ends with a FIN when
			// it has no unread data: its host's legacy programs may see a
			// clean end there.
			if h := c.byIID[r.Host]; h == nil || !h.killedDuring(r.Start.Add(-2*time.Second), r.End) {
				in.Truncated++
				other := "(no other side)"
				if r.Side == "client" {
					if s, ok := c.serverRecord(r.ID); ok {
						other = s.String()
					}
				} else {
					for _, cr := range clients {
						if cr.ID == r.ID {
							other = cr.String()
						}
					}
				}
				report("TRUNCATED (clean end before all the data, proxy alive on %s): %v\n  other side: %s", r.Host, r, other)
			}
		}
	}
	for _, r := range clients {
		s, ok := byID[r.ID]
		if r.Outcome != legacy.OK {
			if ok && s.Outcome == legacy.OK {
				in.ServerOnly++
			}
			continue
		}
		switch {
		case !ok:
			in.Lost++
			report("LOST: client OK but no server side: %v", r)
		case s.Outcome != legacy.OK || s.BytesVerified != r.BytesSent || s.FramesVerified != r.Frames:
			in.Lost++
			report("LOST: client OK but server side differs:\n  %v\n  %v", r, s)
		case r.Mode == legacy.Echo && r.BytesVerified != s.BytesSent:
			in.Lost++
			report("LOST: echo verified %d bytes, server echoed %d:\n  %v\n  %v", r.BytesVerified, s.BytesSent, r, s)
		}
	}
	if len(problems) > 0 {
		t.Errorf("integrity violated (%s):\n%s", in, strings.Join(problems, "\n"))
	}
	return in
}

// checkCallerAddresses asserts that every server side saw the connection
// come from the calling instance's IP, as the server's proxy assigns it.
func (c *cluster) checkCallerAddresses(t *testing.T) {
	t.Helper()
	for _, r := range c.servers.Records() {
		if r.ID == 0 || r.Peer == "" {
			continue
		}
		want, ok := c.byIID[r.Host].view.Lookup(r.Peer)
		got, err := netip.ParseAddrPort(r.Remote)
		if !ok || err != nil || got.Addr() != want {
			t.Errorf("server %s saw connection #%d from %s, want the caller %s's instance IP %s", r.Host, r.ID, r.Remote, r.Peer, want)
		}
	}
}

// fault is one injected fault, for the logs and the figures.
type fault struct {
	Kind       string // impair, flap, kill, linkdown
	Host       string
	Start, End time.Time // End: the fault was undone (and recovery checked)
	Detail     string
	Survived   bool // after it, new connections through the host verified
}

func (f fault) String() string {
	s := fmt.Sprintf("%s %s for %v", f.Kind, f.Host, f.End.Sub(f.Start).Round(10*time.Millisecond))
	if f.Detail != "" {
		s += " (" + f.Detail + ")"
	}
	if f.Survived {
		s += ", recovered"
	} else {
		s += ", NOT recovered"
	}
	return s
}

// involved returns the hosts a client connection went through: its own,
// and the server's (if known; for api connections of unknown server, every
// api server).
func (c *cluster) involved(r legacy.Record) []string {
	hosts := []string{r.Host}
	switch {
	case r.Peer != "":
		hosts = append(hosts, r.Peer)
	default:
		for _, h := range c.hosts {
			if h.spec.server {
				hosts = append(hosts, h.spec.iid)
			}
		}
	}
	return hosts
}
