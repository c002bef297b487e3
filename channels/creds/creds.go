// Package creds loads an instance's mutual-TLS credentials and keeps them
// current, for channels.Config.TLS: PEM files watched for changes
// (WatchFiles), including the atomic symlink swap by which Kubernetes
// updates secret volumes, or X.509 SVIDs streamed by the SPIFFE Workload
// API (WatchWorkload).
//
// New handshakes use the newest credentials that load; sessions already
// up keep running. Credentials that fail to load (a half-written file, a
// key that does not match its certificate, a certificate for another
// instance) leave the previous ones in use, are logged and counted, and
// are retried on the next change. A certificate that is expired or not
// yet valid when watching starts is an error; one close to expiry is a
// warning, logged once per certificate.
package creds

import (
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// Options are common to every source of credentials.
type Options struct {
	// Self, when set, is the instance the certificate must name (see
	// pki.Match): credentials for another instance are refused, at start
	// and on reload, rather than presented to peers that would refuse them.
	Self *pki.Identity
	// ExpiryWarning is how long before its expiry a certificate in use is
	// logged as expiring soon. Zero means the smaller of DefaultExpiryWarning
	// and a quarter of the certificate's lifetime: short-lived SVIDs are
	// renewed long before a week is left, and cert-manager renews at a
	// third of the lifetime by default.
	ExpiryWarning time.Duration
	// Logger receives loads, rotations, failures and expiry warnings; nil
	// means slog.Default().
	Logger *slog.Logger
}

// DefaultExpiryWarning bounds the default Options.ExpiryWarning.
const DefaultExpiryWarning = 7 * 24 * time.Hour

// Stats describe a source's credentials, for metrics.
type Stats struct {
	// NotAfter is when the certificate in use expires.
	NotAfter time.Time
	// Reloads counts the rotations taken after the first load.
	Reloads uint64
	// Failures counts the credentials refused after the first load, the
	// previous ones being kept. The same bad content counts once.
	Failures uint64
}

// holder is what every source keeps besides the credentials themselves:
// the certificate in use, for expiry warnings and stats, and the counts.
type holder struct {
	log  *slog.Logger
	warn time.Duration

	mu       sync.Mutex
	leaf     *x509.Certificate
	stage    int // expiry messages logged for leaf: 1 expiring, 2 expired
	reloads  uint64
	failures uint64
	lastFail string // the failure last logged; "" after a load
}

func newHolder(o Options) *holder {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	return &holder{log: log, warn: o.ExpiryWarning}
}

// checkSelf refuses material for another instance than o.Self.
func (o Options) checkSelf(m *pki.Material) error {
	if o.Self == nil {
		return nil
	}
	got := m.Identity()
	if err := pki.Match(got, *o.Self); err != nil {
		return fmt.Errorf("certificate names %s, but this proxy is %s", got, *o.Self)
	}
	return nil
}

// loaded records leaf as the certificate in use; attrs describe it in the
// log line.
func (h *holder) loaded(leaf *x509.Certificate, attrs ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	msg := "TLS credentials loaded"
	if h.leaf != nil {
		h.reloads++
		msg = "TLS credentials rotated; new handshakes use them"
	}
	h.leaf, h.stage, h.lastFail = leaf, 0, ""
	h.log.Info(msg, append(attrs, "notAfter", leaf.NotAfter.UTC().Format(time.RFC3339))...)
	h.checkExpiryLocked(time.Now())
}

// failed records credentials that did not load; key identifies their
// content, so that the same bad content is logged and counted once.
func (h *holder) failed(key string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if key == h.lastFail {
		return
	}
	h.lastFail = key
	h.failures++
	h.log.Warn("TLS credentials not reloaded; keeping the current ones", "err", err)
}

func (h *holder) stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := Stats{Reloads: h.reloads, Failures: h.failures}
	if h.leaf != nil {
		s.NotAfter = h.leaf.NotAfter
	}
	return s
}

// threshold is how long before expiry leaf is reported as expiring soon.
func (h *holder) threshold(leaf *x509.Certificate) time.Duration {
	if h.warn > 0 {
		return h.warn
	}
	return min(DefaultExpiryWarning, leaf.NotAfter.Sub(leaf.NotBefore)/4)
}

// checkExpiry logs, once each, that the certificate in use expires soon
// and that it expired.
func (h *holder) checkExpiry(now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.checkExpiryLocked(now)
}

func (h *holder) checkExpiryLocked(now time.Time) {
	leaf := h.leaf
	if leaf == nil {
		return
	}
	notAfter := leaf.NotAfter.UTC().Format(time.RFC3339)
	switch {
	case !now.Before(leaf.NotAfter):
		if h.stage < 2 {
			h.stage = 2
			h.log.Error("TLS certificate expired; new handshakes fail until it is replaced",
				"notAfter", notAfter)
		}
	case !now.Before(leaf.NotAfter.Add(-h.threshold(leaf))):
		if h.stage < 1 {
			h.stage = 1
			h.log.Warn("TLS certificate expires soon; renew it (tcpproxy reloads it without a restart)",
				"notAfter", notAfter, "left", leaf.NotAfter.Sub(now).Round(time.Second).String())
		}
	}
}

// nextCheck is how long until the next expiry message may be due, or -1.
func (h *holder) nextCheck(now time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.leaf == nil || h.stage >= 2:
		return -1
	case h.stage == 1:
		return max(h.leaf.NotAfter.Sub(now), 0)
	}
	return max(h.leaf.NotAfter.Add(-h.threshold(h.leaf)).Sub(now), 0)
}

// resetAlarm sets t to fire at the next expiry check, if any.
func (h *holder) resetAlarm(t *time.Timer) {
	if d := h.nextCheck(time.Now()); d >= 0 {
		t.Reset(d)
	} else {
		t.Stop()
	}
}

// describe returns log attributes for m.
func describe(m *pki.Material) []any {
	id := m.Identity()
	attrs := []any{"iid", id.IID}
	if id.Role != "" {
		attrs = append(attrs, "role", id.Role)
	}
	if uris := m.Leaf().URIs; len(uris) == 1 {
		attrs = append(attrs, "uri", uris[0].String())
	}
	return attrs
}

// Source is credentials that rotate, as Files and Workload do.
type Source interface {
	pki.Credentials
	// Stats describe the certificate in use and the rotations so far.
	Stats() Stats
	// Close stops following rotations.
	Close() error
}

var (
	_ Source = (*Files)(nil)
	_ Source = (*Workload)(nil)
)
