package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"gopkg.in/yaml.v3"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// fileConfig is the YAML configuration of `tcpproxy run`.
type fileConfig struct {
	IID  string `yaml:"iid"`
	Role string `yaml:"role"`
	// Listen is the transport address other proxies dial.
	Listen string `yaml:"listen"`
	// Advertise is the transport address published for this instance in a
	// registry (etcd) when Listen is a wildcard such as 0.0.0.0:7000.
	Advertise string `yaml:"advertise"`
	// Network is where legacy sockets live: loopback (default) or tun.
	Network    string           `yaml:"network"`
	TUN        tunConfig        `yaml:"tun"`
	Addressing addressingConfig `yaml:"addressing"`
	Members    membersConfig    `yaml:"members"`
	TLS        tlsConfig        `yaml:"tls"`
	Transport  transportConfig  `yaml:"transport"`
	Channels   map[string]proxy.ChannelConfig
	Legacy     legacyConfig `yaml:"legacy"`
	Log        logConfig    `yaml:"log"`
	// DrainTimeout bounds Shutdown's wait for open connections.
	DrainTimeout duration `yaml:"drainTimeout"`
	// Admin, when set, is 127.0.0.1:port, where net/http/pprof
	// (/debug/pprof/) and a goroutine count (/debug/vars) are served.
	Admin string `yaml:"admin"`
	// Metrics, when set, is an ip:port on any address (e.g. 0.0.0.0:9100)
	// where Prometheus metrics, and nothing else, are served for scraping.
	Metrics string `yaml:"metrics"`
}

type addressingConfig struct {
	InstanceRange string `yaml:"instanceRange"`
	RequestRange  string `yaml:"requestRange"`
}

// transportConfig tunes the sessions between proxies; zero values keep
// the channels package's defaults.
type transportConfig struct {
	// KeepAlive is the session ping period that detects a silent peer
	// (default 15s).
	KeepAlive duration `yaml:"keepAlive"`
	// DialTimeout bounds connecting to a peer (default 5s).
	DialTimeout duration `yaml:"dialTimeout"`
	// HandshakeTimeout bounds the TLS and session handshake and a stream's
	// header (default 5s).
	HandshakeTimeout duration `yaml:"handshakeTimeout"`
	// Sessions is how many connections this proxy dials to each peer it
	// sends streams to (default 2, at most 16); new streams go to the
	// least busy.
	Sessions int `yaml:"sessions"`
	// SameHost says how to reach a peer at a loopback address: "unix"
	// (default) over a Unix domain socket when the peer offers one in
	// this network namespace, falling back to TCP; "tcp" always over TCP.
	SameHost string `yaml:"sameHost"`
	// Insecure allows sessions without TLS with proxies on other hosts,
	// for networks that are private and already encrypted (WireGuard):
	// a peer is then taken to be the member whose address it dials from.
	// Without tls and without it, only loopback addresses are allowed.
	Insecure bool `yaml:"insecure"`
	// MaxSessionAge, when set, replaces sessions older than this (new
	// handshake, new certificates); the old one closes once its
	// connections have ended.
	MaxSessionAge duration `yaml:"maxSessionAge"`
	// MaxHandshakes bounds the connections from other proxies whose
	// handshake is in progress (default 256), and MaxHandshakesPerIP
	// those from one IP address (default 32): connections beyond are
	// closed at once, so that a host that opens connections and never
	// completes them cannot exhaust file descriptors.
	MaxHandshakes      int `yaml:"maxHandshakes"`
	MaxHandshakesPerIP int `yaml:"maxHandshakesPerIP"`
	// MaxStreamWindow is the largest receive window of one stream
	// (default 16MiB): a bulk stream moves at most this much per round
	// trip, so a long fat link (1 Gbit/s at 200 ms holds 25 MB in
	// flight) wants more. A stream's window also stays under a quarter of
	// MaxSessionBuffered.
	MaxStreamWindow byteSize `yaml:"maxStreamWindow"`
	// MaxSessionBuffered bounds what a peer sent on one session that
	// nothing read yet (default 256MiB); past it, the streams it sends on
	// are reset.
	MaxSessionBuffered byteSize `yaml:"maxSessionBuffered"`
	// CongestionControl is the TCP congestion control algorithm of the
	// sessions' connections (Linux): "cubic", "bbr", ... Empty (the
	// default) keeps the host's (net.ipv4.tcp_congestion_control).
	CongestionControl string `yaml:"congestionControl"`
}

// tlsConfig is the `tls:` section (mutual TLS between proxies) and
// members.etcd.tls (a client of etcd); see tls.go.
type tlsConfig struct {
	// Cert, Key and CA are PEM files: the certificate chain (leaf first),
	// its private key, and the CA bundle peers must chain to (old and new
	// CA together while a CA rotates). They are reloaded when they change.
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
	CA   string `yaml:"ca"`
	// Poll is how often the files are re-read besides file-system
	// notifications (default 1m).
	Poll duration `yaml:"poll"`
	// ExpiryWarning is how long before expiry the certificate in use is
	// logged as expiring soon (default: 7 days, or a quarter of its
	// lifetime if that is shorter).
	ExpiryWarning duration `yaml:"expiryWarning"`
	// SPIFFE names instances by SPIFFE ID (X.509 SVIDs) instead of
	// tcpproxy URIs.
	SPIFFE *spiffeConfig `yaml:"spiffe"`
}

type spiffeConfig struct {
	// TrustDomain is the only trust domain accepted, e.g. example.org.
	TrustDomain string `yaml:"trustDomain"`
	// IDTemplate is the path of an instance's SPIFFE ID, with {iid} and
	// optionally {role} as whole segments, e.g. /ns/{role}/sa/{iid}.
	IDTemplate string `yaml:"idTemplate"`
	// Socket, when set, is the SPIFFE Workload API endpoint (e.g.
	// unix:///run/spire/sockets/agent.sock) that streams the SVID and the
	// trust bundle, in place of cert, key and ca.
	Socket string `yaml:"socket"`
}

type legacyConfig struct {
	// OnChange says what happens to the legacy program when a duplex
	// membership changes: ignore (default), restart, or a signal name
	// (SIGHUP, SIGUSR1, ...).
	OnChange string `yaml:"onChange"`
	// StopTimeout is how long the program gets after SIGTERM before SIGKILL.
	StopTimeout duration `yaml:"stopTimeout"`
}

type logConfig struct {
	Format string `yaml:"format"` // text (default) or json
	Level  string `yaml:"level"`  // debug, info (default), warn, error
}

// duration is a time.Duration written as "1.5s" in YAML.
type duration time.Duration

// durationWords says what a duration field expects.
const durationWords = "a duration such as 500ms, 5s or 1m (a number with a unit)"

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return &valueError{Line: n.Line, Value: n.Value, Want: "a duration such as 500ms, 5s or 1m"}
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return &valueError{Line: n.Line, Value: s, Want: durationWords}
	}
	if v < 0 {
		return &valueError{Line: n.Line, Value: s, Want: "a duration of zero or more"}
	}
	*d = duration(v)
	return nil
}

// byteSize is a size in bytes, written as a number of bytes or with a
// unit: 16MiB, 512KiB, 20MB.
type byteSize int64

// sizeWords says what a size field expects.
const sizeWords = "a size such as 16MiB, 512KiB or 1048576 (bytes)"

func (b *byteSize) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return &valueError{Line: n.Line, Value: n.Value, Want: sizeWords}
	}
	v, err := humanize.ParseBytes(s)
	if err != nil || v > math.MaxInt64 {
		return &valueError{Line: n.Line, Value: s, Want: sizeWords}
	}
	*b = byteSize(v)
	return nil
}

// valueError is a value of a custom YAML type (a duration) that does not
// parse; parseConfig names its path.
type valueError struct {
	Line  int
	Value string
	Want  string
	Path  string // set by explainTypeErrors when it finds the value
}

func (e *valueError) Error() string {
	where := fmt.Sprintf("line %d", e.Line)
	if e.Path != "" {
		where = fmt.Sprintf("%s (line %d)", e.Path, e.Line)
	}
	return fmt.Sprintf("%s: %q is not %s", where, e.Value, e.Want)
}

// loadConfig reads and validates a configuration file.
func loadConfig(path string) (*fileConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	data, err = expandEnv(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	cfg, err := parseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// expandEnv replaces ${NAME} with the environment variable NAME, so that
// one file serves every replica (iid: ${POD_NAME}). Only the braced form
// is expanded, and an unset variable is an error rather than "".
func expandEnv(data []byte) ([]byte, error) {
	var missing []string
	out := envRef.ReplaceAllFunc(data, func(m []byte) []byte {
		name := string(m[2 : len(m)-1])
		v, ok := os.LookupEnv(name)
		if !ok {
			missing = append(missing, name)
		}
		return []byte(v)
	})
	if len(missing) > 0 {
		return nil, fmt.Errorf("environment variables not set: %s", strings.Join(missing, ", "))
	}
	return out, nil
}

var envRef = regexp.MustCompile(`\$\{[A-Za-z_][A-Za-z0-9_]*\}`)

// parseConfig decodes strictly (unknown fields and duplicate keys are
// errors, named by their path in the file) and validates.
func parseConfig(data []byte) (*fileConfig, error) {
	var root yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(data)).Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errEmptyConfig
		}
		return nil, err
	}
	if len(root.Content) == 0 || root.Content[0].Tag == "!!null" {
		return nil, errEmptyConfig
	}
	if root.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("line %d: the configuration must be a mapping of fields (iid: ..., listen: ...), not %s", root.Content[0].Line, yamlKind(root.Content[0]))
	}
	if errs := unknownFields(&root, reflect.TypeFor[fileConfig]()); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var cfg fileConfig
	if err := root.Decode(&cfg); err != nil {
		return nil, explainTypeErrors(&root, err)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

func yamlKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return fmt.Sprintf("the value %q", n.Value)
	}
	return "this"
}

func (c *fileConfig) validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("listen: missing transport address (e.g. 0.0.0.0:7000)"))
	}
	switch c.Network {
	case "", "loopback", "tun":
	default:
		errs = append(errs, fmt.Errorf("network: unknown %q (want loopback or tun)", c.Network))
	}
	if err := c.TUN.validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.addressing(); err != nil {
		errs = append(errs, err)
	}
	if err := validateAdmin(c.Admin); err != nil {
		errs = append(errs, err)
	}
	if err := validateMetrics(c.Metrics, c.Admin, c.Listen); err != nil {
		errs = append(errs, err)
	}
	if err := c.Members.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.TLS.validateTransport(c.IID, c.Role); err != nil {
		errs = append(errs, err)
	}
	if n := c.Transport.Sessions; n < 0 || n > channels.MaxSessionsPerPeer {
		errs = append(errs, fmt.Errorf("transport.sessions: %d is outside 1..%d (0 means the default, %d)", n, channels.MaxSessionsPerPeer, channels.DefaultSessionsPerPeer))
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"maxHandshakes", c.Transport.MaxHandshakes}, {"maxHandshakesPerIP", c.Transport.MaxHandshakesPerIP}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("transport.%s: %d is negative (0 means the default)", f.name, f.v))
		}
	}
	if err := channels.CheckCongestionControl(c.Transport.CongestionControl); err != nil {
		errs = append(errs, fmt.Errorf("transport.congestionControl: %w", err))
	}
	if w := int64(c.Transport.MaxStreamWindow); w != 0 && (w < channels.MinStreamWindow || w > math.MaxUint32) {
		errs = append(errs, fmt.Errorf("transport.maxStreamWindow: %s is outside 256KiB..4GiB (0 means the default, 16MiB)", humanize.IBytes(uint64(w))))
	}
	if b := int64(c.Transport.MaxSessionBuffered); b != 0 && b < channels.MinSessionBuffered {
		errs = append(errs, fmt.Errorf("transport.maxSessionBuffered: %s is below 1MiB (0 means the default, 256MiB)", humanize.IBytes(uint64(b))))
	}
	switch c.Transport.SameHost {
	case "", "unix", "tcp":
	default:
		errs = append(errs, fmt.Errorf("transport.sameHost: %q is not unix or tcp", c.Transport.SameHost))
	}
	if err := c.checkPlaintext(c.Members.Static); err != nil {
		errs = append(errs, err)
	}
	switch c.Legacy.OnChange {
	case "", "ignore", "restart":
	default:
		if _, ok := signalByName(c.Legacy.OnChange); !ok {
			errs = append(errs, fmt.Errorf("legacy.onChange: %q is not ignore, restart or a signal name like SIGHUP", c.Legacy.OnChange))
		}
	}
	switch c.Log.Format {
	case "", "text", "json":
	default:
		errs = append(errs, fmt.Errorf("log.format: unknown %q (want text or json)", c.Log.Format))
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		errs = append(errs, err)
	}
	for _, f := range []struct{ what, v string }{{"iid", c.IID}, {"role", c.Role}} {
		if err := proxy.ValidateName(f.what, f.v); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, validateChannels(c.Channels)...)
	return errors.Join(errs...)
}

// validateChannels checks each channel and names it by its path in the
// file (channels.cache: unknown kind ...) rather than as proxy.Validate
// does for Go callers (channel "cache": ...).
func validateChannels(chs map[string]proxy.ChannelConfig) []error {
	if len(chs) == 0 {
		return []error{errors.New("channels: none configured (e.g. channels: {cache: {kind: reply, port: 6379}})")}
	}
	var errs []error
	for _, n := range slices.Sorted(maps.Keys(chs)) {
		if err := chs[n].Validate(n); err != nil {
			msg := strings.TrimPrefix(err.Error(), fmt.Sprintf("channel %q: ", n))
			errs = append(errs, fmt.Errorf("channels.%s: %s", n, msg))
		}
	}
	return errs
}

func (c *fileConfig) addressing() (proxy.Addressing, error) {
	var a proxy.Addressing
	var err error
	if c.Addressing.InstanceRange != "" {
		if a.InstanceRange, err = netip.ParsePrefix(c.Addressing.InstanceRange); err != nil {
			return a, fmt.Errorf("addressing.instanceRange: %w", err)
		}
	}
	if c.Addressing.RequestRange != "" {
		if a.RequestRange, err = netip.ParsePrefix(c.Addressing.RequestRange); err != nil {
			return a, fmt.Errorf("addressing.requestRange: %w", err)
		}
	}
	return a, a.Validate()
}

// hasTLS reports whether sessions run over TLS.
func (c *fileConfig) hasTLS() bool { return c.TLS.enabled() }

// checkPlaintext refuses a configuration whose sessions would run without
// TLS, and without transport.insecure, on addresses other hosts can reach:
// its listen or advertise address, or those of members.
func (c *fileConfig) checkPlaintext(members []channels.Member) error {
	if c.Transport.Insecure && c.hasTLS() {
		return errors.New("transport.insecure: sessions run over tls, which insecure would not change; remove one of them")
	}
	if c.hasTLS() || c.Transport.Insecure {
		return nil
	}
	var exposed []string
	for _, a := range []struct{ what, addr string }{{"listen", c.Listen}, {"advertise", c.Advertise}} {
		if a.addr != "" && !loopbackAddr(a.addr) {
			exposed = append(exposed, fmt.Sprintf("%s %s", a.what, a.addr))
		}
	}
	for _, m := range members {
		if m.IID != c.IID && m.Addr != "" && !loopbackAddr(m.Addr) {
			exposed = append(exposed, fmt.Sprintf("member %s at %s", m.IID, m.Addr))
		}
	}
	if len(exposed) == 0 {
		return nil
	}
	if len(exposed) > 3 {
		exposed = append(exposed[:3], fmt.Sprintf("and %d more", len(exposed)-3))
	}
	return fmt.Errorf("transport: sessions between proxies would run without TLS on addresses that other hosts can reach (%s), "+
		"where anyone who reaches them could pass for a member. Configure tls (cert, key and ca; "+
		"`tcpproxy certs -dir certs IID:ROLE...` makes a CA and instance certificates), "+
		"or set transport.insecure: true if the network between the proxies is private and already encrypted (WireGuard, IPsec)",
		strings.Join(exposed, ", "))
}

// loopbackAddr reports whether addr (host:port) is on a loopback address:
// a loopback IP or localhost. An address without host listens on every
// interface.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// checkMembersFile applies checkPlaintext to the members in the members
// file as it is at start. A file that cannot be read or parsed is left to
// the membership source to report.
func (c *fileConfig) checkMembersFile() error {
	if c.Members.File == "" {
		return nil
	}
	data, err := os.ReadFile(c.Members.File)
	if err != nil {
		return nil
	}
	members, err := membership.Parse(data)
	if err != nil {
		return nil
	}
	if err := c.checkPlaintext(members); err != nil {
		return fmt.Errorf("members file %s: %w", c.Members.File, err)
	}
	return nil
}
