package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
)

// Kind is the kind of a channel.
type Kind string

// Channel kinds.
const (
	// KindRequest is the client side of a load-balanced link: the legacy
	// client connects to a local request IP and each connection becomes a
	// stream to one reply instance.
	KindRequest Kind = "request"
	// KindReply is the server side: each incoming stream becomes a
	// connection to the legacy server at the bind IP.
	KindReply Kind = "reply"
	// KindDuplex is a symmetric group of instances.
	KindDuplex Kind = "duplex"
)

// Mode says what a duplex channel does for the legacy program.
type Mode string

// Duplex modes.
const (
	// ModeBind: the legacy server binds on its own instance IP and streams
	// from peers become connections to it.
	ModeBind Mode = "bind"
	// ModeConnect: the proxy opens one "impostor" listener per remote member
	// at that member's instance IP and port.
	ModeConnect Mode = "connect"
	// ModeBoth does both, which peer-to-peer clusters (etcd, Redis cluster)
	// need: every member serves and calls the others. It is the default.
	ModeBoth Mode = "both"
)

// Balancer names for request channels.
const (
	BalancerRoundRobin   = "round-robin"
	BalancerLeastStreams = "least-streams"
)

// ChannelConfig configures one channel, as in the original's
// channelName -> {channel, port, mode}.
type ChannelConfig struct {
	Kind Kind `yaml:"kind" json:"kind"`
	// Port is the legacy program's port: the request listener's port, the
	// legacy server's port (reply, duplex bind), or the default port of
	// remote members (duplex connect) when membership gives none.
	Port int `yaml:"port" json:"port"`
	// Mode is only for duplex channels; empty means ModeBoth.
	Mode Mode `yaml:"mode,omitempty" json:"mode,omitempty"`
	// Target is only for request channels: the reply channel's name on the
	// serving instances; empty means the same name.
	Target string `yaml:"target,omitempty" json:"target,omitempty"`
	// Balancer is only for request channels: round-robin (default) or
	// least-streams.
	Balancer string `yaml:"balancer,omitempty" json:"balancer,omitempty"`
	// MaxConnections bounds the channel's concurrent proxied connections
	// (0 means DefaultMaxConnections). Past it new connections and streams
	// are reset at once while existing ones carry on, so a flood degrades
	// to refusals instead of exhausting memory or descriptors.
	MaxConnections int `yaml:"maxConnections,omitempty" json:"maxConnections,omitempty"`
	// IdleTimeout, when positive, resets a connection in both directions
	// once no byte has crossed it either way for that long (slow-loris and
	// abandoned connections); 0 means never, as TCP itself.
	IdleTimeout time.Duration `yaml:"idleTimeout,omitempty" json:"idleTimeout,omitempty"`
}

// DefaultMaxConnections is a channel's default concurrency limit.
const DefaultMaxConnections = 16384

// Mesh is the channel transport the proxy carries streams over;
// *channels.Node implements it. Channels are registered by New, so the
// mesh must not have been started yet.
type Mesh interface {
	// IID and Role are the identity the mesh presents to its peers; they
	// must be the proxy's.
	IID() string
	Role() string
	// Addr is the transport address the mesh listens on, or "" when it
	// only dials.
	Addr() string
	Request(name, target string, b channels.Balancer) (channels.RequestChannel, error)
	Reply(name string) (channels.ReplyChannel, error)
	Duplex(name string) (channels.DuplexChannel, error)
}

// Config is everything a Proxy needs: the original's
// TcpProxy(iid, role, channels) plus where sockets live and how streams
// travel. Only IID, Role and Channels are required.
type Config struct {
	IID      string
	Role     string
	Channels map[string]ChannelConfig
	// Addressing gives the synthetic ranges; zero value = defaults.
	Addressing Addressing
	// Network is where the legacy program's sockets live. Nil means host
	// sockets on 127.0.0.0/8 (NewLoopback), owned by the proxy.
	Network Network
	// Mesh carries streams to other proxies. Nil means the proxy builds a
	// channels.Node from Node and owns it: Start starts it and Shutdown
	// closes it. A Mesh given here belongs to the caller, who starts it
	// after New and closes it after Shutdown.
	Mesh Mesh
	// Node configures the node the proxy builds when Mesh is nil: where it
	// listens (ListenAddr), the membership (Members), TLS, the transport
	// (default TCP) and session tuning. Its IID and Role may be left empty
	// (the proxy's are used) but must not differ from the proxy's.
	Node channels.Config
	// Advertise is the transport address other proxies dial to reach this
	// one, when it differs from the address the mesh listens on (a
	// wildcard listen address, NAT). Self reports it.
	Advertise string
	// DialTimeout bounds connecting to the legacy server (default 5s,
	// channels.DefaultDialTimeout).
	DialTimeout time.Duration
	// Logger receives the proxy's logs (default slog.Default()).
	Logger *slog.Logger
}

// Member is this instance's entry in the membership, as the other proxies
// must see it: its iid and role, the transport address addr they dial, and
// the legacy port of every channel it serves (reply channels, and duplex
// channels that bind). Membership sources that publish the instance (a
// registry, a members file) take it from here; Proxy.Self fills in the
// address.
func (c *Config) Member(addr string) channels.Member {
	m := channels.Member{IID: c.IID, Role: c.Role, Addr: addr, Channels: make(map[string]uint16)}
	for name, cc := range c.Channels {
		if cc.Kind == KindReply || cc.binds() {
			m.Channels[name] = uint16(cc.Port)
		}
	}
	return m
}

// MaxNameLen bounds iids, roles and channel names; the wire format
// length-prefixes them with one byte.
const MaxNameLen = 255

// ValidateName reports what is wrong with an iid, role or channel name;
// what names the field in the error.
func ValidateName(what, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s is empty", what)
	case len(s) > MaxNameLen:
		return fmt.Errorf("%s %.20q... is %d bytes long (at most %d)", what, s, len(s), MaxNameLen)
	case strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		return fmt.Errorf("%s %q contains a space or control character", what, s)
	}
	return nil
}

// Validate checks a channel's configuration; name is used in errors.
func (c ChannelConfig) Validate(name string) error {
	if err := ValidateName("channel name", name); err != nil {
		return err
	}
	switch c.Kind {
	case KindRequest, KindReply, KindDuplex:
	case "":
		return fmt.Errorf("channel %q: missing kind (want request, reply or duplex)", name)
	default:
		return fmt.Errorf("channel %q: unknown kind %q (want request, reply or duplex)", name, c.Kind)
	}
	switch {
	case c.Port == 0:
		return fmt.Errorf("channel %q: missing port", name)
	case c.Port < 1 || c.Port > 65535:
		return fmt.Errorf("channel %q: port %d out of range 1-65535", name, c.Port)
	}
	if c.Kind != KindDuplex && c.Mode != "" {
		return fmt.Errorf("channel %q: mode %q is only for duplex channels, not %s", name, c.Mode, c.Kind)
	}
	switch c.Mode {
	case "", ModeBind, ModeConnect, ModeBoth:
	default:
		return fmt.Errorf("channel %q: unknown mode %q (want bind, connect or both)", name, c.Mode)
	}
	if c.Kind != KindRequest && (c.Target != "" || c.Balancer != "") {
		return fmt.Errorf("channel %q: target and balancer are only for request channels, not %s", name, c.Kind)
	}
	if c.Target != "" {
		if err := ValidateName("channel "+name+": target", c.Target); err != nil {
			return err
		}
	}
	if c.IdleTimeout < 0 {
		return fmt.Errorf("channel %q: idleTimeout %s is negative", name, c.IdleTimeout)
	}
	if c.MaxConnections < 0 {
		return fmt.Errorf("channel %q: maxConnections %d is negative", name, c.MaxConnections)
	}
	switch c.Balancer {
	case "", BalancerRoundRobin, BalancerLeastStreams:
	default:
		return fmt.Errorf("channel %q: unknown balancer %q (want %s or %s)", name, c.Balancer, BalancerRoundRobin, BalancerLeastStreams)
	}
	return nil
}

// mode returns the effective duplex mode.
func (c ChannelConfig) mode() Mode {
	if c.Mode == "" {
		return ModeBoth
	}
	return c.Mode
}

func (c ChannelConfig) maxConnections() int64 {
	if c.MaxConnections == 0 {
		return DefaultMaxConnections
	}
	return int64(c.MaxConnections)
}

func (c ChannelConfig) binds() bool    { return c.Kind == KindDuplex && c.mode() != ModeConnect }
func (c ChannelConfig) connects() bool { return c.Kind == KindDuplex && c.mode() != ModeBind }

func (c ChannelConfig) balancer() channels.Balancer {
	if c.Balancer == BalancerLeastStreams {
		return channels.LeastStreams()
	}
	return channels.RoundRobin()
}

// ValidateChannels checks every channel and reports all problems at once,
// in channel-name order. Channel names are unique by construction (a map);
// configuration parsers must reject duplicate keys themselves.
func ValidateChannels(chs map[string]ChannelConfig) error {
	if len(chs) == 0 {
		return errors.New("no channels configured")
	}
	names := make([]string, 0, len(chs))
	for n := range chs {
		names = append(names, n)
	}
	slices.Sort(names)
	var errs []error
	for _, n := range names {
		if err := chs[n].Validate(n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Validate checks the whole configuration.
func (c *Config) Validate() error {
	var errs []error
	if err := ValidateName("iid", c.IID); err != nil {
		errs = append(errs, err)
	}
	if err := ValidateName("role", c.Role); err != nil {
		errs = append(errs, err)
	}
	if err := ValidateChannels(c.Channels); err != nil {
		errs = append(errs, err)
	}
	if err := c.Addressing.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Mesh != nil {
		if iid, role := c.Mesh.IID(), c.Mesh.Role(); iid != c.IID || role != c.Role {
			errs = append(errs, fmt.Errorf("the mesh is instance %q (role %q) but the proxy is %q (role %q)", iid, role, c.IID, c.Role))
		}
	} else if (c.Node.IID != "" && c.Node.IID != c.IID) || (c.Node.Role != "" && c.Node.Role != c.Role) {
		errs = append(errs, fmt.Errorf("Node is instance %q (role %q) but the proxy is %q (role %q)", c.Node.IID, c.Node.Role, c.IID, c.Role))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("proxy config: %w", err)
	}
	return nil
}
