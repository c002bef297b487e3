package channels

import (
	"cmp"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// Refusal is a session or a stream that a node refused (Config.OnRefused).
type Refusal struct {
	// Stream is true for a stream, false for a session.
	Stream bool
	// Dialed is true for a session this node set out to dial, false for
	// one a peer dialed (and for every stream).
	Dialed bool
	// Reason is one of the Refused... constants.
	Reason string
	// Remote is the peer's address; Claimed the instance id the peer
	// claimed, empty when it named none.
	Remote, Claimed string
	// Err says what was wrong, in words.
	Err error
}

// Why a session or stream was refused (Refusal.Reason).
const (
	// RefusedTimeout: no complete handshake, or stream header, in
	// Config.HandshakeTimeout (an idle connection, for instance).
	RefusedTimeout = "timeout"
	// RefusedProtocol: the bytes are not the tcpproxy handshake or stream
	// header of this version.
	RefusedProtocol = "protocol"
	// RefusedTLS: the TLS handshake failed (no certificate, or one the CA
	// did not sign).
	RefusedTLS = "tls"
	// RefusedIdentity: the peer's certificate, or the dialed peer's
	// answer, names another instance or role than expected.
	RefusedIdentity = "identity"
	// RefusedSelf: the peer claims this node's own instance id.
	RefusedSelf = "self"
	// RefusedNotMember: the claimed instance is not a current member.
	RefusedNotMember = "not_member"
	// RefusedRole: the claimed role is not the member's.
	RefusedRole = "role"
	// RefusedPlaintext: a session without TLS with a peer outside this
	// network namespace, on a node not configured Insecure.
	RefusedPlaintext = "plaintext"
	// RefusedAddress: without TLS, a connection that does not come from
	// the claimed member's address.
	RefusedAddress = "address"
	// RefusedPeer: the dialed peer refused this node's handshake.
	RefusedPeer = "peer"
	// RefusedSource: a stream header names a source other than the
	// session's peer.
	RefusedSource = "source"
	// RefusedChannel: a stream for a channel this node does not serve.
	RefusedChannel = "channel"
	// RefusedForbidden: a stream for a channel the peer may not use: it
	// is no longer a member, or the duplex channel is not one of its own.
	RefusedForbidden = "forbidden"
	// RefusedBacklog: the channel's accept backlog is full.
	RefusedBacklog = "backlog"
	// RefusedOverload: a connection closed at once because too many
	// handshakes are in progress, in all or from its address
	// (Config.MaxHandshakes, MaxHandshakesPerIP), or a session beyond
	// the 64 that one member may dial to this node.
	RefusedOverload = "overload"
)

// refusalError is an error with the reason it is reported under.
type refusalError struct {
	reason string
	err    error
}

func (e *refusalError) Error() string { return e.err.Error() }
func (e *refusalError) Unwrap() error { return e.err }

// refused wraps err with reason.
func refused(reason string, err error) error { return &refusalError{reason: reason, err: err} }

// refusalLogInterval is how often the refusals from one address that
// followed the first are summed up in one line (a variable for tests).
var refusalLogInterval = 10 * time.Second

// maxRefusalAddrs bounds the addresses whose refusals are summed up one
// by one; refusals from further addresses share one summary.
const maxRefusalAddrs = 256

// refusalLog writes refusals to the log without letting a flood of them
// flood the log: the first refusal from an address is logged at once, in
// full; those that follow within refusalLogInterval are counted, and a
// summary per address is logged at the end of the interval. An address
// that stays quiet for a whole interval is forgotten, so its next refusal
// is logged at once again. Memory is bounded by maxRefusalAddrs.
type refusalLog struct {
	log      *slog.Logger
	interval time.Duration

	mu    sync.Mutex
	addrs map[string]*refusalTally
	other refusalTally // refusals from addresses beyond maxRefusalAddrs
}

// refusalTally counts refusals not logged yet.
type refusalTally struct {
	sessions, streams int
	reasons           map[string]int
	last              Refusal
}

func newRefusalLog(log *slog.Logger) *refusalLog {
	return &refusalLog{log: log, interval: refusalLogInterval, addrs: make(map[string]*refusalTally)}
}

// add logs r, or counts it for the next summary.
func (l *refusalLog) add(key string, r Refusal) {
	l.mu.Lock()
	t, ok := l.addrs[key]
	if !ok && len(l.addrs) < maxRefusalAddrs {
		l.addrs[key] = &refusalTally{}
		l.mu.Unlock()
		what := "session refused"
		if r.Stream {
			what = "stream refused"
		}
		l.log.Warn(what, "reason", r.Reason, "remote", r.Remote, "claimed_iid", r.Claimed, "err", r.Err,
			"further_refusals", fmt.Sprintf("summed up every %v", l.interval))
		return
	}
	if !ok {
		t = &l.other
	}
	t.count(r)
	l.mu.Unlock()
}

func (t *refusalTally) count(r Refusal) {
	if r.Stream {
		t.streams++
	} else {
		t.sessions++
	}
	if t.reasons == nil {
		t.reasons = make(map[string]int)
	}
	t.reasons[r.Reason]++
	t.last = r
}

// flush logs a summary for every address with refusals counted since the
// last flush, and forgets the addresses without.
func (l *refusalLog) flush() {
	type summary struct {
		key string
		t   refusalTally
	}
	var out []summary
	l.mu.Lock()
	for key, t := range l.addrs {
		if t.sessions+t.streams == 0 {
			delete(l.addrs, key)
			continue
		}
		out = append(out, summary{key, *t})
		*t = refusalTally{}
	}
	slices.SortFunc(out, func(a, b summary) int { return cmp.Compare(a.key, b.key) })
	if l.other.sessions+l.other.streams > 0 {
		out = append(out, summary{fmt.Sprintf("(more than %d other addresses)", maxRefusalAddrs), l.other})
		l.other = refusalTally{}
	}
	l.mu.Unlock()
	for _, s := range out {
		reasons := make([]string, 0, len(s.t.reasons))
		for _, r := range slices.Sorted(maps.Keys(s.t.reasons)) {
			reasons = append(reasons, fmt.Sprintf("%s=%d", r, s.t.reasons[r]))
		}
		l.log.Warn("refused again", "from", s.key, "sessions", s.t.sessions, "streams", s.t.streams,
			"in", l.interval, "reasons", strings.Join(reasons, " "),
			"last_remote", s.t.last.Remote, "last_claimed_iid", s.t.last.Claimed, "last_err", s.t.last.Err)
	}
}

// run flushes l and sessions every interval until done is closed, then
// once more.
func (l *refusalLog) run(done <-chan struct{}, sessions *sessionLog) {
	t := time.NewTicker(l.interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-done:
			l.flush()
			sessions.flush(l.interval)
			return
		}
		l.flush()
		sessions.flush(l.interval)
	}
}

// addrKey is what refusals are aggregated by: the IP of a TCP peer (its
// port changes with every connection), the network otherwise.
func addrKey(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap().String()
	}
	if a == nil {
		return "unknown"
	}
	return a.Network()
}

// refuse reports a refused session or stream: to Config.OnRefused, and to
// the log, aggregated by the peer's address.
func (n *Node) refuse(remote net.Addr, r Refusal) {
	switch {
	case r.Remote != "" || remote == nil:
	case remote.Network() == "unix":
		r.Remote = "same-host socket"
	default:
		r.Remote = remote.String()
	}
	if n.cfg.OnRefused != nil {
		n.cfg.OnRefused(r)
	}
	n.refusals.add(addrKey(remote), r)
}

// sessionLogBurst is how many lines about its sessions coming up and
// closing a peer gets per refusalLogInterval before the rest are summed
// up: enough for MaxSessionsPerPeer sessions to come up and close.
const sessionLogBurst = 2 * MaxSessionsPerPeer

// sessionLog writes the lines of sessions coming up and closing, at most
// sessionLogBurst per peer per interval: the others are counted and
// summed up in one line per peer at the end of the interval, so that a
// member that reconnects without end cannot flood the log. Sessions are
// held only with members, so the peers tracked are a bounded set.
type sessionLog struct {
	log *slog.Logger

	mu    sync.Mutex
	peers map[string]*sessionTally
}

// sessionTally counts a peer's session lines in the current interval.
type sessionTally struct {
	logged, up, closed int
}

func newSessionLog(log *slog.Logger) *sessionLog {
	return &sessionLog{log: log, peers: make(map[string]*sessionTally)}
}

// allow reports whether a line about a session with peer coming up (or,
// with up false, closing) may be logged now; if not, it is counted.
func (l *sessionLog) allow(peer string, up bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	t := l.peers[peer]
	if t == nil {
		t = &sessionTally{}
		l.peers[peer] = t
	}
	switch {
	case t.logged < sessionLogBurst:
		t.logged++
		return true
	case up:
		t.up++
	default:
		t.closed++
	}
	return false
}

// flush sums up the lines not logged in the interval that ends, and
// starts the next.
func (l *sessionLog) flush(interval time.Duration) {
	l.mu.Lock()
	peers := l.peers
	l.peers = make(map[string]*sessionTally)
	l.mu.Unlock()
	for _, peer := range slices.Sorted(maps.Keys(peers)) {
		if t := peers[peer]; t.up+t.closed > 0 {
			l.log.Info("sessions up and closed again", "peer", peer, "up", t.up, "closed", t.closed, "in", interval)
		}
	}
}
