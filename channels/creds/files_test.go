package creds

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

var (
	web   = pki.Identity{IID: "web-1", Role: "web"}
	cache = pki.Identity{IID: "cache-0", Role: "cache"}
)

const (
	waitFor = 5 * time.Second
	tick    = 5 * time.Millisecond
)

func filesConfig(sd *credstest.SecretDir, l *logs) FilesConfig {
	cert, key, ca := sd.Paths()
	self := web
	// A long poll: changes must be noticed through notifications.
	return FilesConfig{Cert: cert, Key: key, CA: ca, Poll: time.Hour, Options: Options{Self: &self, Logger: l.logger()}}
}

// TestFilesKubernetesSwap: the certificate and the CA bundle change in
// one atomic swap of the ..data link, as the kubelet updates a secret
// volume (cert-manager renewing, a CA rotating to a bundle of old and new
// CAs): the new material is in use at once, without polling.
func TestFilesKubernetesSwap(t *testing.T) {
	ca1, ca2 := credstest.NewCA(t, "ca1"), credstest.NewCA(t, "ca2")
	sd := credstest.NewSecretDir(t)
	sd.Put(t, ca1, nil, web, ca1.CertPEM())
	var l logs
	f, err := WatchFiles(filesConfig(sd, &l))
	require.NoError(t, err)
	defer f.Close()
	first := f.Current()
	assert.Equal(t, web, first.Identity())
	assert.Equal(t, "ca1", first.Leaf().Issuer.CommonName)

	sd.Put(t, ca2, nil, web, credstest.Bundle(ca1, ca2))
	require.Eventually(t, func() bool { return f.Current() != first }, waitFor, tick, "the swap was not picked up")
	m := f.Current()
	assert.Equal(t, "ca2", m.Leaf().Issuer.CommonName)
	// Peers of either CA verify while the bundle holds both.
	for _, ca := range []*pki.CA{ca1, ca2} {
		peer := issue(t, ca, nil, cache, ca.CertPEM())
		_, err := m.Verify(peer.Chain(), x509.ExtKeyUsageClientAuth)
		require.NoError(t, err, ca.Cert.Subject.CommonName)
	}
	st := f.Stats()
	assert.Equal(t, uint64(1), st.Reloads)
	assert.Equal(t, uint64(0), st.Failures)
	assert.True(t, st.NotAfter.Equal(m.Leaf().NotAfter))
	assert.Equal(t, 1, l.count(slog.LevelInfo, "rotated"))

	// The old CA dropped: its certificates no longer verify.
	sd.Put(t, ca2, nil, web, ca2.CertPEM())
	require.Eventually(t, func() bool { return f.Current() != m }, waitFor, tick)
	_, err = f.Current().Verify(issue(t, ca1, nil, cache, ca1.CertPEM()).Chain(), x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "unknown authority")
}

func issue(t *testing.T, ca *pki.CA, spiffe *pki.SPIFFEMapping, id pki.Identity, bundle []byte) *pki.Material {
	t.Helper()
	cert, key := credstest.Issue(t, ca, spiffe, id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	m, err := pki.ParseMaterial(cert, key, bundle, spiffe)
	require.NoError(t, err)
	return m
}

// TestFilesKeepOldOnBadFiles: files rewritten in place by a writer that is
// not atomic go through states that do not load; each keeps the material
// in use, is counted and logged once, and the good state is taken when
// it comes.
func TestFilesKeepOldOnBadFiles(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "ca.pem")
	now := time.Now()
	cert1, key1 := credstest.Issue(t, ca, nil, web, now.Add(-time.Minute), now.Add(time.Hour))
	cert2, key2 := credstest.Issue(t, ca, nil, web, now.Add(-time.Minute), now.Add(2*time.Hour))
	other, otherKey := credstest.Issue(t, ca, nil, cache, now.Add(-time.Minute), now.Add(time.Hour))
	write := func(name string, data []byte) { require.NoError(t, os.WriteFile(name, data, 0o600)) }
	write(certFile, cert1)
	write(keyFile, key1)
	write(caFile, ca.CertPEM())
	var l logs
	self := web
	f, err := WatchFiles(FilesConfig{Cert: certFile, Key: keyFile, CA: caFile, Poll: time.Hour, Options: Options{Self: &self, Logger: l.logger()}})
	require.NoError(t, err)
	defer f.Close()
	first := f.Current()

	failures := func(n uint64) func() bool { return func() bool { return f.Stats().Failures == n } }
	write(certFile, cert2[:len(cert2)/2]) // half-written
	require.Eventually(t, failures(1), waitFor, tick)
	write(certFile, cert2) // the key is still the old one
	require.Eventually(t, failures(2), waitFor, tick)
	assert.Contains(t, l.attr("not reloaded", "err"), "private key does not match public key")
	write(certFile, other) // a certificate for another instance
	write(keyFile, otherKey)
	require.Eventually(t, failures(3), waitFor, tick)
	assert.Contains(t, l.attr("not reloaded", "err"), `certificate names instance "cache-0" (role "cache"), but this proxy is instance "web-1" (role "web")`)
	assert.Same(t, first, f.Current(), "bad files must leave the material in use")
	assert.Equal(t, 3, l.count(slog.LevelWarn, "not reloaded"))

	write(certFile, cert2)
	write(keyFile, key2)
	require.Eventually(t, func() bool { return f.Current() != first }, waitFor, tick)
	assert.True(t, f.Current().Leaf().NotAfter.Equal(f.Stats().NotAfter))
	assert.Equal(t, uint64(1), f.Stats().Reloads)
}

// TestFilesPollOnly: without file-system notifications, polling notices
// changes.
func TestFilesPollOnly(t *testing.T) {
	newNotifier = func() (*fsnotify.Watcher, error) { return nil, errors.New("too many open files") }
	defer func() { newNotifier = fsnotify.NewWatcher }()
	ca := credstest.NewCA(t, "ca")
	sd := credstest.NewSecretDir(t)
	sd.Put(t, ca, nil, web, ca.CertPEM())
	var l logs
	cfg := filesConfig(sd, &l)
	cfg.Poll = 20 * time.Millisecond
	f, err := WatchFiles(cfg)
	require.NoError(t, err)
	defer f.Close()
	first := f.Current()
	sd.Put(t, ca, nil, web, ca.CertPEM())
	require.Eventually(t, func() bool { return f.Current() != first }, waitFor, tick)
	assert.Equal(t, 1, l.count(slog.LevelWarn, "polling only"))
}

func TestFilesStartErrors(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	now := time.Now()
	for _, tc := range []struct {
		name                string
		id                  pki.Identity
		notBefore, notAfter time.Time
		want                string
	}{
		{"expired", web, now.Add(-2 * time.Hour), now.Add(-time.Hour), "expired at"},
		{"not yet valid", web, now.Add(time.Hour), now.Add(2 * time.Hour), "is not valid yet"},
		{"another instance", cache, now.Add(-time.Minute), now.Add(time.Hour), `certificate names instance "cache-0"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sd := credstest.NewSecretDir(t)
			cert, key := credstest.Issue(t, ca, nil, tc.id, tc.notBefore, tc.notAfter)
			sd.Update(t, map[string][]byte{credstest.CertFile: cert, credstest.KeyFile: key, credstest.CAFile: ca.CertPEM()})
			var l logs
			_, err := WatchFiles(filesConfig(sd, &l))
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, err, credstest.CertFile, "the error names the files")
		})
	}
	var l logs
	_, err := WatchFiles(filesConfig(credstest.NewSecretDir(t), &l))
	require.ErrorIs(t, err, os.ErrNotExist)
}

// TestFilesExpiry: a certificate close to expiry is a warning at load, and
// its expiry an error, each logged once.
func TestFilesExpiry(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	sd := credstest.NewSecretDir(t)
	now := time.Now()
	// A quarter of the lifetime or less is left: expiring soon.
	cert, key := credstest.Issue(t, ca, nil, web, now.Add(-time.Hour), now.Add(3*time.Second))
	sd.Update(t, map[string][]byte{credstest.CertFile: cert, credstest.KeyFile: key, credstest.CAFile: ca.CertPEM()})
	var l logs
	f, err := WatchFiles(filesConfig(sd, &l))
	require.NoError(t, err)
	defer f.Close()
	assert.Equal(t, 1, l.count(slog.LevelWarn, "expires soon"))
	assert.True(t, f.Stats().NotAfter.Equal(f.Current().Leaf().NotAfter))
	require.Eventually(t, func() bool { return l.count(slog.LevelError, "expired") == 1 }, 10*time.Second, tick)
	assert.Equal(t, 1, l.count(slog.LevelWarn, "expires soon"))
}

func TestExpiryThreshold(t *testing.T) {
	h := newHolder(Options{})
	now := time.Now()
	year := &x509.Certificate{NotBefore: now, NotAfter: now.Add(365 * 24 * time.Hour)}
	hour := &x509.Certificate{NotBefore: now, NotAfter: now.Add(time.Hour)}
	assert.Equal(t, DefaultExpiryWarning, h.threshold(year))
	assert.Equal(t, 15*time.Minute, h.threshold(hour), "a short-lived certificate warns at a quarter of its lifetime")
	h = newHolder(Options{ExpiryWarning: 48 * time.Hour})
	assert.Equal(t, 48*time.Hour, h.threshold(hour))
}

func TestFailuresCountedOnce(t *testing.T) {
	var l logs
	h := newHolder(Options{Logger: l.logger()})
	h.failed("a", errors.New("bad a"))
	h.failed("a", errors.New("bad a"))
	h.failed("b", errors.New("bad b"))
	assert.Equal(t, uint64(2), h.stats().Failures)
	assert.Equal(t, 2, l.count(slog.LevelWarn, "not reloaded"))
}

// TestClientFiles: a registry client presents the current certificate and
// verifies the server's host name against the bundle.
func TestClientFiles(t *testing.T) {
	ca, other := credstest.NewCA(t, "ca"), credstest.NewCA(t, "other")
	now := time.Now()
	serverPEM, serverKey, err := ca.IssueCert(pki.CertSpec{URI: web.URI(), Name: "etcd", Hosts: []string{"127.0.0.1"}, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
	serverCert, err := tls.X509KeyPair(serverPEM, serverKey)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool})
	require.NoError(t, err)
	defer ln.Close()
	clients := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(clients)
				return
			}
			tc := c.(*tls.Conn)
			if tc.Handshake() == nil {
				clients <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
			}
			c.Close()
		}
	}()

	sd := credstest.NewSecretDir(t)
	put := func(name string, issuer *pki.CA, bundle []byte) {
		cert, key, err := issuer.IssueCert(pki.CertSpec{URI: web.URI(), Name: name, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)})
		require.NoError(t, err)
		sd.Update(t, map[string][]byte{credstest.CertFile: cert, credstest.KeyFile: key, credstest.CAFile: bundle})
	}
	put("client-1", ca, ca.CertPEM())
	cert, key, caFile := sd.Paths()
	var l logs
	c, err := LoadClientFiles(FilesConfig{Cert: cert, Key: key, CA: caFile, Poll: time.Hour, Options: Options{Logger: l.logger()}})
	require.NoError(t, err)
	ctx, cancel := contextWithCancel(t)
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	dial := func(host string) error {
		conn, err := tls.Dial("tcp", ln.Addr().String(), withServerName(c.TLSConfig(), host))
		if err == nil {
			err = conn.Close()
		}
		return err
	}
	require.NoError(t, dial("127.0.0.1"))
	assert.Equal(t, "client-1", <-clients)
	require.ErrorContains(t, dial("etcd.example"), "wanted to match etcd.example")

	put("client-2", ca, ca.CertPEM())
	require.Eventually(t, func() bool { return c.Stats().Reloads == 1 }, waitFor, tick)
	require.NoError(t, dial("127.0.0.1"))
	assert.Equal(t, "client-2", <-clients, "the new client certificate is presented")

	put("client-3", ca, other.CertPEM()) // the server's CA dropped
	require.Eventually(t, func() bool { return c.Stats().Reloads == 2 }, waitFor, tick)
	require.ErrorContains(t, dial("127.0.0.1"), "unknown authority", "a configuration made now has the new bundle")

	_, err = LoadClientFiles(FilesConfig{Cert: cert, Key: key, CA: caFile, Options: Options{Self: &web}})
	require.ErrorContains(t, err, "name no instance")
}

func withServerName(cfg *tls.Config, name string) *tls.Config {
	cfg.ServerName = name
	return cfg
}
