package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/creds"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// membersConfig is the `members:` section: exactly one of file, static,
// etcd or dns (none: nobody, and then no other proxy is accepted). Every
// instance that dials this one must be listed: sessions are taken only
// from members.
type membersConfig struct {
	// File is a members YAML file, watched for changes.
	File string `yaml:"file"`
	// Poll is how often File is checked (default 500ms).
	Poll duration `yaml:"poll"`
	// Static lists the members inline.
	Static []channels.Member `yaml:"static"`
	// Etcd is an etcd v3 registry where this instance registers itself.
	Etcd *etcdMembers `yaml:"etcd"`
	// DNS polls the SRV or A/AAAA records of a headless service.
	DNS *dnsMembers `yaml:"dns"`
}

type etcdMembers struct {
	Endpoints    []string  `yaml:"endpoints"`
	Prefix       string    `yaml:"prefix"`
	TTL          duration  `yaml:"ttl"`
	DialTimeout  duration  `yaml:"dialTimeout"`
	TLS          tlsConfig `yaml:"tls"`
	Username     string    `yaml:"username"`
	PasswordFile string    `yaml:"passwordFile"`
	// Register publishes this instance (default true).
	Register *bool `yaml:"register"`
}

type dnsMembers struct {
	Name     string            `yaml:"name"`
	Service  string            `yaml:"service"`
	Proto    string            `yaml:"proto"`
	Port     uint16            `yaml:"port"`
	Role     string            `yaml:"role"`
	Channels map[string]uint16 `yaml:"channels"`
	Interval duration          `yaml:"interval"`
}

func (m membersConfig) validate() error {
	n := 0
	for _, set := range []bool{m.File != "", len(m.Static) > 0, m.Etcd != nil, m.DNS != nil} {
		if set {
			n++
		}
	}
	if n > 1 {
		return errors.New("members: give one of file, static, etcd or dns, not several")
	}
	if m.Etcd != nil {
		if len(m.Etcd.Endpoints) == 0 {
			return errors.New("members.etcd: endpoints are missing")
		}
		if err := m.Etcd.TLS.validateClient("members.etcd.tls"); err != nil {
			return err
		}
	}
	if m.DNS != nil && m.DNS.Name == "" {
		return errors.New("members.dns: name is missing")
	}
	return validateStatic(m.Static)
}

// validateStatic checks an inline member list as strictly as a members
// file is checked (every member valid, no iid twice), except that a member
// may have no address: one this proxy never dials, such as a client
// embedded in another program that does not listen.
func validateStatic(list []channels.Member) error {
	var errs []error
	first := make(map[string]int)
	for i, m := range list {
		at := fmt.Sprintf("members.static[%d]", i)
		if err := membership.ValidateMember(m, false); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
			continue
		}
		if err := proxy.ValidateName("iid", m.IID); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
		}
		if j, dup := first[m.IID]; dup {
			errs = append(errs, fmt.Errorf("%s: iid %q is listed twice (first as members.static[%d])", at, m.IID, j))
			continue
		}
		first[m.IID] = i
	}
	return errors.Join(errs...)
}

// self is this instance as other members must see it: the channels it
// serves and the transport address they dial.
func (c *fileConfig) self() channels.Member {
	addr := c.Advertise
	if addr == "" {
		addr = c.Listen
	}
	pc := proxy.Config{IID: c.IID, Role: c.Role, Channels: c.Channels}
	return pc.Member(addr)
}

// membersFor builds the membership source cfg names.
func membersFor(cfg *fileConfig, log *slog.Logger) (channels.Source, error) {
	m := cfg.Members
	switch {
	case m.File != "":
		return membership.File(m.File, time.Duration(m.Poll)), nil
	case m.Etcd != nil:
		ec := membership.EtcdConfig{
			Endpoints: m.Etcd.Endpoints, Prefix: m.Etcd.Prefix, TTL: time.Duration(m.Etcd.TTL),
			DialTimeout: time.Duration(m.Etcd.DialTimeout), Username: m.Etcd.Username, Logger: log,
		}
		if m.Etcd.PasswordFile != "" {
			pw, err := os.ReadFile(m.Etcd.PasswordFile)
			if err != nil {
				return nil, fmt.Errorf("members.etcd.passwordFile: %w", err)
			}
			ec.Password = strings.TrimSpace(string(pw))
		}
		var files *creds.ClientFiles
		if m.Etcd.TLS.Cert != "" {
			var err error
			if files, err = m.Etcd.TLS.clientCredentials(log); err != nil {
				return nil, fmt.Errorf("members.etcd.tls: %w", err)
			}
			ec.TLS = files.TLSConfig()
		}
		var self *channels.Member
		if m.Etcd.Register == nil || *m.Etcd.Register {
			s := cfg.self()
			if host, _, err := net.SplitHostPort(s.Addr); err != nil || host == "" || net.ParseIP(host).IsUnspecified() {
				return nil, fmt.Errorf("members.etcd: cannot register %q as this instance's address; set advertise to an address peers can dial", s.Addr)
			}
			self = &s
		}
		src, err := membership.Etcd(ec, self)
		if err != nil || files == nil {
			return src, err
		}
		return reloadingSource{src, files}, nil
	case m.DNS != nil:
		return membership.DNS(membership.DNSConfig{
			Name: m.DNS.Name, Service: m.DNS.Service, Proto: m.DNS.Proto, Port: m.DNS.Port,
			Role: m.DNS.Role, Channels: m.DNS.Channels, Interval: time.Duration(m.DNS.Interval), Logger: log,
		}), nil
	}
	return membership.Static(m.Static...), nil
}
