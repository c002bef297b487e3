package channels

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/pki"
	"github.com/tcpproxy/tcpproxy/channels/wire"

	"github.com/tcpproxy/tcpproxy/internal/defaults"
)

// Config configures a Node. The zero value of every optional field selects
// a default.
type Config struct {
	// IID and Role identify this node in the mesh and in handshakes.
	IID, Role string
	// ListenAddr is where other nodes reach this one, e.g. "127.0.0.1:0".
	// Empty means the node does not listen and only dials.
	ListenAddr string
	// Transport carries sessions; nil means TCP.
	Transport Transport
	// TLS, when set, runs mutual TLS 1.3 on every session. Each new
	// handshake presents TLS.Current()'s certificate, as server and as
	// client, and verifies the peer's against its CA bundle: a dialed peer
	// must be the member dialed, an accepted one the instance (and role)
	// its handshake claims. Sessions already up are not disturbed when the
	// credentials rotate. Reconnects resume TLS sessions of the same
	// credentials, with the same checks. See TLSConfigFromFiles and
	// package channels/creds.
	TLS pki.Credentials
	// Insecure allows sessions without TLS with peers at any address. By
	// default a node without TLS holds plaintext sessions only with peers
	// in its own network namespace (loopback addresses, the same-host
	// socket, MemoryTransport), and refuses to dial or accept any other:
	// without TLS nothing proves who is at the other end of a connection
	// from another host. Set it only where the network between the nodes
	// is private and already encrypted (a WireGuard mesh, for instance).
	// A peer is then trusted to be member X when this node dialed X's
	// address, or when its connection comes from the IP of X's address.
	// Insecure has no effect when TLS is set.
	Insecure bool
	// Members publishes the mesh; nil means nobody. Sessions are held
	// only with members, so every instance that dials this node must be
	// listed, with its role, dialing clients included. A member the node
	// never dials may be listed without an address (Member.Addr), as an
	// embedded client that does not listen; the sources that read a file,
	// a registry or DNS require one, as `tcpproxy run` always listens.
	Members Source
	// Logger receives the node's logs; nil means slog.Default().
	Logger *slog.Logger

	// DialTimeout bounds connecting to a peer (default 5s).
	DialTimeout time.Duration
	// HandshakeTimeout bounds the TLS and session handshake, and reading a
	// stream header (default 5s).
	HandshakeTimeout time.Duration
	// KeepAliveInterval is the period of session pings that detect dead
	// peers (default 15s).
	KeepAliveInterval time.Duration

	// MaxHandshakes bounds the connections accepted whose handshake is
	// in progress (default 256), and MaxHandshakesPerIP those of them
	// from one remote IP (default 32; an IPv6 /64 counts as one IP;
	// connections over the same-host socket count only in the total).
	// A connection beyond either is closed at once and refused with
	// reason RefusedOverload, so that a host that opens connections and
	// never completes their handshakes holds at most MaxHandshakesPerIP
	// goroutines and file descriptors, for at most HandshakeTimeout
	// each, and peers from other addresses keep being served. Sessions
	// already up are not counted.
	MaxHandshakes, MaxHandshakesPerIP int

	// BackoffMin and BackoffMax bound the delay between failed dials to one
	// peer (defaults 50ms and 5s). The delay doubles on each failure, with
	// jitter, and resets after a successful handshake.
	BackoffMin, BackoffMax time.Duration

	// MaxStreamWindow is the largest per-stream receive window (default
	// 16 MiB, at least 256 KiB). Large windows let bulk streams fill the
	// link; memory is only used while the reader lags behind.
	MaxStreamWindow uint32
	// MaxSessionBuffered bounds the data a session holds that a peer sent
	// and nothing read yet, over all the session's streams (default
	// 256 MiB, at least 1 MiB): a peer that opens many streams and sends
	// on them while nothing reads them gets, past it, the streams it sends
	// on reset (Status().Limits.RefusedMemory). Windows stop growing well
	// before it, so a peer running tcpproxy reaches it only with hundreds
	// of streams whose legacy side reads nothing at all.
	MaxSessionBuffered int64
	// CongestionControl is the TCP congestion control algorithm of the
	// sessions' TCP connections, dialed and accepted (TCP_CONGESTION, on
	// Linux): "cubic", "bbr", ... Empty keeps the host's default
	// (net.ipv4.tcp_congestion_control). See CheckCongestionControl.
	CongestionControl string
	// SessionsPerPeer is how many sessions (TCP connections) this node
	// dials to each peer it opens streams to (default 2, at most 16). New
	// streams go to the session carrying the fewest. More than one spreads
	// the work of busy peers over more threads (each session has one
	// reader and one writer goroutine), and keeps one lost connection from
	// holding up every stream.
	SessionsPerPeer int
	// AcceptBacklog is the per-channel queue of accepted streams waiting
	// for Accept (default 128). When it is full, a new stream waits for
	// room for up to HandshakeTimeout, and is reset then.
	AcceptBacklog int
	// MaxSessionAge, when positive, retires sessions older than this: a
	// retired session takes no new streams (a new session, with a fresh
	// handshake and the credentials of the day, takes them), and it is
	// closed once the streams it carries have ended, so no stream is cut
	// because of its age. Zero keeps sessions for as long as they work.
	MaxSessionAge time.Duration

	// OnHandshake, when set, is called after every session handshake, as
	// dialer (dialed) or listener, with its duration and outcome (metrics).
	// It must not block.
	OnHandshake func(peer string, dialed bool, d time.Duration, err error)
	// OnRefused, when set, is called for every session and every stream
	// the node refuses, with the reason (metrics: unlike the logs, which
	// aggregate refusals per remote address, it sees each one). It must
	// not block.
	OnRefused func(Refusal)
}

// Defaults.
const (
	DefaultDialTimeout        = defaults.DialTimeout
	DefaultHandshakeTimeout   = 5 * time.Second
	DefaultKeepAliveInterval  = 15 * time.Second
	DefaultSessionsPerPeer    = 2
	DefaultBackoffMin         = 50 * time.Millisecond
	DefaultBackoffMax         = 5 * time.Second
	DefaultMaxStreamWindow    = 16 << 20
	DefaultMaxSessionBuffered = mux.DefaultMaxBuffered
	DefaultAcceptBacklog      = 128
	DefaultMaxHandshakes      = 256
	DefaultMaxHandshakesPerIP = 32
	// MaxSessionsPerPeer keeps SessionsPerPeer to what can help: each
	// session is a connection, three goroutines and its buffers.
	MaxSessionsPerPeer = 16
	// MinStreamWindow is the multiplexer's initial window (channels/mux);
	// a smaller MaxStreamWindow is refused.
	MinStreamWindow = 256 << 10
	// MinSessionBuffered is the least MaxSessionBuffered.
	MinSessionBuffered = 1 << 20
)

// withDefaults validates c and fills in its defaults.
func (c Config) withDefaults() (Config, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case c.IID == "":
		bad("IID is empty")
	case len(c.IID) > wire.MaxNameLen:
		bad("IID length %d exceeds %d", len(c.IID), wire.MaxNameLen)
	}
	if len(c.Role) > wire.MaxNameLen {
		bad("Role length %d exceeds %d", len(c.Role), wire.MaxNameLen)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"DialTimeout", c.DialTimeout}, {"HandshakeTimeout", c.HandshakeTimeout},
		{"KeepAliveInterval", c.KeepAliveInterval}, {"BackoffMin", c.BackoffMin}, {"BackoffMax", c.BackoffMax},
		{"MaxSessionAge", c.MaxSessionAge},
	} {
		if d.v < 0 {
			bad("%s %v is negative", d.name, d.v)
		}
	}
	if c.AcceptBacklog < 0 {
		bad("AcceptBacklog %d is negative", c.AcceptBacklog)
	}
	if c.MaxHandshakes < 0 {
		bad("MaxHandshakes %d is negative", c.MaxHandshakes)
	}
	if c.MaxHandshakesPerIP < 0 {
		bad("MaxHandshakesPerIP %d is negative", c.MaxHandshakesPerIP)
	}
	if c.SessionsPerPeer < 0 || c.SessionsPerPeer > MaxSessionsPerPeer {
		bad("SessionsPerPeer %d is outside [0, %d]", c.SessionsPerPeer, MaxSessionsPerPeer)
	}
	if c.MaxStreamWindow != 0 && c.MaxStreamWindow < MinStreamWindow {
		bad("MaxStreamWindow %d is below the protocol minimum %d", c.MaxStreamWindow, MinStreamWindow)
	}
	if c.MaxSessionBuffered != 0 && c.MaxSessionBuffered < MinSessionBuffered {
		bad("MaxSessionBuffered %d is below %d", c.MaxSessionBuffered, MinSessionBuffered)
	}
	if err := CheckCongestionControl(c.CongestionControl); err != nil {
		bad("CongestionControl: %v", err)
	}
	if c.TLS != nil && c.TLS.Current() == nil {
		bad("TLS credentials have no certificate (mutual TLS needs one on both sides)")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.DialTimeout, DefaultDialTimeout)
	def(&c.HandshakeTimeout, DefaultHandshakeTimeout)
	def(&c.KeepAliveInterval, DefaultKeepAliveInterval)
	def(&c.BackoffMin, DefaultBackoffMin)
	def(&c.BackoffMax, DefaultBackoffMax)
	if c.BackoffMin > c.BackoffMax {
		bad("BackoffMin %v exceeds BackoffMax %v", c.BackoffMin, c.BackoffMax)
	}
	if c.MaxStreamWindow == 0 {
		c.MaxStreamWindow = DefaultMaxStreamWindow
	}
	if c.MaxSessionBuffered == 0 {
		c.MaxSessionBuffered = DefaultMaxSessionBuffered
	}
	if c.AcceptBacklog == 0 {
		c.AcceptBacklog = DefaultAcceptBacklog
	}
	if c.SessionsPerPeer == 0 {
		c.SessionsPerPeer = DefaultSessionsPerPeer
	}
	if c.MaxHandshakes == 0 {
		c.MaxHandshakes = DefaultMaxHandshakes
	}
	if c.MaxHandshakesPerIP == 0 {
		c.MaxHandshakesPerIP = DefaultMaxHandshakesPerIP
	}
	if c.Transport == nil {
		c.Transport = TCPTransport()
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("channels config: %w", err)
	}
	return c, nil
}
