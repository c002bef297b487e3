package membership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
)

// DNS defaults.
const (
	DefaultDNSInterval = 5 * time.Second
	DefaultDNSTimeout  = 5 * time.Second
)

// DNSConfig configures a DNS membership source: the instances are the
// records of a headless service, such as a Kubernetes Service with
// clusterIP: None.
type DNSConfig struct {
	// Name is the DNS name to look up, e.g.
	// "cache.prod.svc.cluster.local". A trailing dot makes it absolute
	// (no search domains).
	Name string
	// Service, when set, selects SRV records: _Service._Proto.Name (for
	// Kubernetes, the name of the Service's port). Each target is one
	// member: its iid is the first label of the target host name and its
	// addr is target:port. Without Service, the A and AAAA records of Name
	// are the members: the iid is the IP with dashes for dots and colons
	// ("10-1-2-3") and the addr is IP:Port.
	Service string
	// Proto is the SRV protocol (default "tcp").
	Proto string
	// Port is the transport port of every member for A/AAAA records; SRV
	// records carry their own.
	Port uint16
	// Role and Channels are given to every member, since DNS does not
	// carry them.
	Role     string
	Channels map[string]uint16
	// Interval is the polling period (default 5s).
	Interval time.Duration
	// Timeout bounds each lookup (default 5s).
	Timeout time.Duration
	// Resolver does the lookups; nil means net.DefaultResolver.
	Resolver *net.Resolver
	// Logger receives the source's logs; nil means slog.Default().
	Logger *slog.Logger
}

// DNS returns a Source that polls the records cfg names and publishes the
// members they list, sorted by iid, whenever they change. A name that does
// not exist (NXDOMAIN) or has no records is an empty list: a headless
// service lists no instance until one is ready. Other lookup failures
// keep the previous list and are logged once; at the first lookup they are
// an error from Watch, as is an invalid cfg.
func DNS(cfg DNSConfig) channels.Source {
	return &dnsSource{cfg: cfg}
}

type dnsSource struct {
	cfg DNSConfig
}

func (s *dnsSource) config() (DNSConfig, error) {
	cfg := s.cfg
	var errs []error
	if cfg.Name == "" {
		errs = append(errs, errors.New("empty name"))
	}
	if cfg.Service == "" && cfg.Port == 0 {
		errs = append(errs, errors.New("A/AAAA lookups need a port (or give a service for SRV)"))
	}
	if cfg.Interval < 0 || cfg.Timeout < 0 {
		errs = append(errs, errors.New("negative interval or timeout"))
	}
	if len(cfg.Role) > maxNameLen {
		errs = append(errs, fmt.Errorf("role length %d exceeds %d", len(cfg.Role), maxNameLen))
	}
	for name, port := range cfg.Channels {
		if name == "" || len(name) > maxNameLen || port == 0 {
			errs = append(errs, fmt.Errorf("channel %q: need a name of 1-%d bytes and a port 1-65535", name, maxNameLen))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cfg, fmt.Errorf("dns membership: %w", err)
	}
	if cfg.Proto == "" {
		cfg.Proto = "tcp"
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultDNSInterval
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultDNSTimeout
	}
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg, nil
}

func (s *dnsSource) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	cfg, err := s.config()
	if err != nil {
		return nil, err
	}
	p := &dnsPoller{cfg: cfg, log: cfg.Logger.With("membership", "dns", "name", cfg.describe())}
	members, warnings, err := p.lookup(ctx)
	if err != nil {
		return nil, fmt.Errorf("dns membership %s: %w", cfg.describe(), err)
	}
	p.warn(warnings)
	out := newLatest()
	out.offer(clone(members))
	go p.poll(ctx, out, members) // ends with ctx, as Source requires
	return out.ch, nil
}

// describe names what is looked up, for logs and errors.
func (c DNSConfig) describe() string {
	if c.Service != "" {
		return "_" + c.Service + "._" + c.Proto + "." + c.Name + " SRV"
	}
	return c.Name + " A/AAAA"
}

type dnsPoller struct {
	cfg          DNSConfig
	log          *slog.Logger
	lastErr      string
	lastWarnings []string
}

func (p *dnsPoller) poll(ctx context.Context, out *latest, last []channels.Member) {
	defer out.close()
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		members, warnings, err := p.lookup(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// Log each distinct problem once, not on every poll.
			if err.Error() != p.lastErr {
				p.lastErr = err.Error()
				p.log.Error("lookup failed; keeping the previous member list", "err", err)
			}
			continue
		}
		if p.lastErr != "" {
			p.lastErr = ""
			p.log.Info("lookup works again")
		}
		p.warn(warnings)
		if equal(members, last) {
			continue
		}
		last = members
		p.log.Info("member list changed", "members", len(members))
		out.offer(clone(members))
	}
}

// warn logs problems with single records when they differ from the last
// poll's.
func (p *dnsPoller) warn(warnings []string) {
	if slices.Equal(warnings, p.lastWarnings) {
		return
	}
	p.lastWarnings = warnings
	for _, w := range warnings {
		p.log.Warn(w)
	}
}

// lookup returns the current members, sorted by iid, and the records it
// skipped.
func (p *dnsPoller) lookup(ctx context.Context) ([]channels.Member, []string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	byIID := make(map[string]channels.Member)
	var warnings []string
	add := func(m channels.Member) {
		if m.IID == "" {
			warnings = append(warnings, fmt.Sprintf("skipping %s: no iid in the name", m.Addr))
			return
		}
		m.Role, m.Channels = p.cfg.Role, maps.Clone(p.cfg.Channels)
		if m.Channels == nil {
			m.Channels = map[string]uint16{}
		}
		if err := ValidateMember(m, true); err != nil {
			warnings = append(warnings, fmt.Sprintf("skipping a record: %v", err))
			return
		}
		if prev, dup := byIID[m.IID]; dup {
			// Keep the smaller addr, so that every proxy picks the same.
			keep, drop := prev, m
			if m.Addr < prev.Addr {
				keep, drop = m, prev
			}
			byIID[m.IID] = keep
			warnings = append(warnings, fmt.Sprintf("iid %q names both %s and %s; keeping %s", m.IID, keep.Addr, drop.Addr, keep.Addr))
			return
		}
		byIID[m.IID] = m
	}
	if p.cfg.Service != "" {
		_, srvs, err := p.cfg.Resolver.LookupSRV(ctx, p.cfg.Service, p.cfg.Proto, p.cfg.Name)
		if err != nil {
			if notFound(err) {
				return []channels.Member{}, nil, nil
			}
			if len(srvs) == 0 {
				return nil, nil, err
			}
			// Some records had invalid names and were dropped.
			warnings = append(warnings, err.Error())
		}
		for _, srv := range srvs {
			host := strings.TrimSuffix(srv.Target, ".")
			if host == "" {
				continue // target ".": the service is not offered (RFC 2782)
			}
			iid, _, _ := strings.Cut(host, ".")
			add(channels.Member{IID: iid, Addr: net.JoinHostPort(host, strconv.Itoa(int(srv.Port)))})
		}
	} else {
		ips, err := p.cfg.Resolver.LookupNetIP(ctx, "ip", p.cfg.Name)
		if err != nil {
			if notFound(err) {
				return []channels.Member{}, nil, nil
			}
			return nil, nil, err
		}
		for _, ip := range ips {
			ip = ip.Unmap()
			add(channels.Member{IID: ipIID(ip), Addr: netip.AddrPortFrom(ip, p.cfg.Port).String()})
		}
	}
	members := slices.SortedFunc(maps.Values(byIID), func(a, b channels.Member) int {
		return strings.Compare(a.IID, b.IID)
	})
	slices.Sort(warnings)
	return members, warnings, nil
}

// ipIID is the iid of an instance known only by its IP: the IP with dashes
// for dots and colons, as Kubernetes names pods by IP (10-1-2-3).
func ipIID(ip netip.Addr) string {
	return strings.NewReplacer(".", "-", ":", "-", "%", "-").Replace(ip.String())
}

// notFound reports whether err says that the name has no records.
func notFound(err error) bool {
	var de *net.DNSError
	return errors.As(err, &de) && de.IsNotFound
}
