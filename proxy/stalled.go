package proxy

import (
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// Resets that arrive while a direction waits to send.
//
// The direction that moves a legacy program's data into a stream does not
// read the legacy connection while its send waits: for the stream's window
// when the program at the far end does not read, or for a congested
// session. A reset from the legacy program then sits in its socket
// unnoticed, and the far program's connection stays open for as long as it
// does not read, which may be forever. A direct connection, or a proxy that
// polls its sockets for errors, would have passed the reset on at once.
//
// So once per stallCheck the proxy looks at the connections whose send has
// been waiting since its previous look, and resets those whose legacy
// connection the program has reset. The look costs one poll(2) per such
// connection and nothing for the others; a reset is passed on within two
// stallChecks.
const stallCheck = time.Second

// sendWatch counts a direction's sends into its stream: odd while one is in
// progress. A count that is odd and unchanged since the previous look is
// one send that waited all that time.
type sendWatch struct{ n atomic.Uint32 }

func (w *sendWatch) begin() { w.n.Add(1) }
func (w *sendWatch) end()   { w.n.Add(1) }

// watchStalledSends runs checkStalledSends every stallCheck until the
// proxy stops.
func (p *Proxy) watchStalledSends() {
	t := time.NewTicker(stallCheck)
	defer t.Stop()
	var stalled []*proxiedConn
	for {
		select {
		case <-t.C:
			stalled = p.checkStalledSends(stalled)
		case <-p.ctx.Done():
			return
		}
	}
}

// checkStalledSends resets the connections whose send into the stream has
// waited since the previous call and whose legacy program has reset its
// connection meanwhile. stalled is scratch space, returned for reuse.
func (p *Proxy) checkStalledSends(stalled []*proxiedConn) []*proxiedConn {
	p.mu.Lock()
	for pc := range p.conns {
		n := pc.sends.n.Load()
		if n&1 == 1 && n == pc.sendsSeen {
			stalled = append(stalled, pc)
		}
		pc.sendsSeen = n
	}
	p.mu.Unlock()
	for _, pc := range stalled {
		pc.mu.Lock()
		legacy := pc.legacy
		pc.mu.Unlock()
		if legacy == nil || !peerReset(legacy) {
			continue
		}
		p.log.Debug("legacy connection reset while its data waited for the stream; resetting the stream", "channel", pc.cs.name, "legacy_remote", legacy.RemoteAddr())
		pc.kill()
	}
	clear(stalled)
	return stalled[:0]
}

// peerReset reports whether c's peer has reset it, without reading it and
// without consuming the error: the relay, whose send may complete before
// the connection is reset, must still read the reset, not an EOF it would
// pass on as a clean end. A netconn.ResetChecker says so itself; a kernel
// socket with a pending error (an RST, a retransmission timeout) polls
// POLLERR, which leaves the error for the next read (SO_ERROR would take
// it).
func peerReset(c netconn.Conn) bool {
	if r, ok := c.(netconn.ResetChecker); ok {
		return r.PeerReset()
	}
	rc := rawConn(c)
	if rc == nil {
		return false
	}
	failed := false
	_ = rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd)}} // POLLERR needs no asking
		if n, err := unix.Poll(fds, 0); err == nil && n == 1 {
			failed = fds[0].Revents&unix.POLLERR != 0
		}
	})
	return failed
}
