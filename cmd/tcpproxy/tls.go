package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/creds"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// workloadStartTimeout bounds the wait for the first SVID from the
// Workload API, so that a proxy whose agent is missing says so.
const workloadStartTimeout = 30 * time.Second

// validateTransport checks the `tls:` section of the proxy iid/role.
func (t tlsConfig) validateTransport(iid, role string) error {
	if t.SPIFFE == nil {
		return t.validateFiles("tls")
	}
	var errs []error
	s := t.SPIFFE
	if m, err := s.mapping(); err != nil {
		errs = append(errs, err)
	} else if _, err := m.ID(pki.Identity{IID: iid, Role: role}); err != nil {
		errs = append(errs, fmt.Errorf("tls.spiffe.idTemplate: this instance has no SPIFFE ID under %s: %w", s.IDTemplate, err))
	}
	if s.Socket != "" {
		if err := workloadapi.ValidateAddress(s.socketAddr()); err != nil {
			errs = append(errs, fmt.Errorf("tls.spiffe.socket: %q: %w (want unix:///path/to/agent.sock)", s.Socket, err))
		}
		if t.Cert != "" || t.Key != "" || t.CA != "" {
			errs = append(errs, errors.New("tls.spiffe.socket: the SVID, its key and the trust bundle come from the Workload API; remove tls.cert, tls.key and tls.ca"))
		}
		if t.Poll != 0 {
			errs = append(errs, errors.New("tls.poll: applies to files; the Workload API pushes rotations itself"))
		}
	} else if t.Cert == "" || t.Key == "" || t.CA == "" {
		errs = append(errs, errors.New("tls.spiffe: needs tls.cert, tls.key and tls.ca (the SVID, its key and the trust domain's CA bundle), or tls.spiffe.socket for the Workload API"))
	}
	return errors.Join(errs...)
}

// validateClient checks the TLS section of a registry's client, field.
func (t tlsConfig) validateClient(field string) error {
	if t.SPIFFE != nil {
		return fmt.Errorf("%s.spiffe: not supported: the registry's certificates name hosts, not instances", field)
	}
	return t.validateFiles(field)
}

func (t tlsConfig) validateFiles(field string) error {
	set := t.Cert != "" || t.Key != "" || t.CA != ""
	switch {
	case set && (t.Cert == "" || t.Key == "" || t.CA == ""):
		return fmt.Errorf("%s: cert, key and ca are all needed for mutual TLS", field)
	case !set && (t.Poll != 0 || t.ExpiryWarning != 0):
		return fmt.Errorf("%s: poll and expiryWarning apply to cert, key and ca, which are not set", field)
	}
	return nil
}

// mapping validates the block and returns its SPIFFE mapping.
func (s *spiffeConfig) mapping() (*pki.SPIFFEMapping, error) {
	var errs []error
	if s.TrustDomain == "" {
		errs = append(errs, errors.New("tls.spiffe.trustDomain: missing (the trust domain's name, e.g. example.org)"))
	} else if _, err := pki.ParseTrustDomain(s.TrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("tls.spiffe.trustDomain: %w", err))
	}
	if s.IDTemplate == "" {
		errs = append(errs, errors.New("tls.spiffe.idTemplate: missing (the path of an instance's SPIFFE ID, with {iid} and optionally {role} as whole segments, e.g. /ns/{role}/sa/{iid})"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	m, err := pki.NewSPIFFEMapping(s.TrustDomain, s.IDTemplate)
	if err != nil {
		return nil, fmt.Errorf("tls.spiffe.idTemplate: %w", err)
	}
	return m, nil
}

// socketAddr is Socket as go-spiffe wants it: a bare path is a Unix socket.
func (s *spiffeConfig) socketAddr() string {
	if filepath.IsAbs(s.Socket) {
		return "unix://" + s.Socket
	}
	return s.Socket
}

// enabled says whether the section sets up mutual TLS between proxies
// (from files or from the Workload API).
func (t tlsConfig) enabled() bool {
	return t.Cert != "" || (t.SPIFFE != nil && t.SPIFFE.Socket != "")
}

// transportCredentials loads the `tls:` section's credentials for
// instance self, nil without TLS; they follow rotations until closed.
func (t tlsConfig) transportCredentials(ctx context.Context, self pki.Identity, log *slog.Logger) (creds.Source, error) {
	opts := creds.Options{Self: &self, ExpiryWarning: time.Duration(t.ExpiryWarning), Logger: log.With("component", "tls")}
	var spiffe *pki.SPIFFEMapping
	if t.SPIFFE != nil {
		var err error
		if spiffe, err = t.SPIFFE.mapping(); err != nil {
			return nil, err
		}
	}
	switch {
	case !t.enabled():
		return nil, nil
	case t.Cert == "":
		ctx, cancel := context.WithTimeout(ctx, workloadStartTimeout)
		defer cancel()
		src, err := creds.WatchWorkload(ctx, creds.WorkloadConfig{Addr: t.SPIFFE.socketAddr(), SPIFFE: spiffe, Options: opts})
		if err != nil {
			return nil, fmt.Errorf("tls.spiffe.socket: %w", err)
		}
		return src, nil
	default:
		src, err := creds.WatchFiles(creds.FilesConfig{
			Cert: t.Cert, Key: t.Key, CA: t.CA, SPIFFE: spiffe, Poll: time.Duration(t.Poll), Options: opts,
		})
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		return src, nil
	}
}

// clientCredentials loads a registry client's certificate and CA bundle.
func (t tlsConfig) clientCredentials(log *slog.Logger) (*creds.ClientFiles, error) {
	return creds.LoadClientFiles(creds.FilesConfig{
		Cert: t.Cert, Key: t.Key, CA: t.CA, Poll: time.Duration(t.Poll),
		Options: creds.Options{ExpiryWarning: time.Duration(t.ExpiryWarning), Logger: log.With("component", "etcd-tls")},
	})
}

// reloadingSource keeps a registry client's credentials current for as
// long as its membership is watched.
type reloadingSource struct {
	channels.Source
	files *creds.ClientFiles
}

func (s reloadingSource) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	ch, err := s.Source.Watch(ctx)
	if err == nil {
		go s.files.Run(ctx) // ends with ctx, as the membership does
	}
	return ch, err
}
