package pki_test

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

var (
	web   = pki.Identity{IID: "web-1", Role: "web"}
	cache = pki.Identity{IID: "cache-0", Role: "cache"}
)

func hourFromNow() (time.Time, time.Time) {
	return time.Now().Add(-time.Minute), time.Now().Add(time.Hour)
}

func material(t *testing.T, ca *pki.CA, spiffe *pki.SPIFFEMapping, id pki.Identity, bundle []byte) *pki.Material {
	t.Helper()
	nb, na := hourFromNow()
	cert, key := credstest.Issue(t, ca, spiffe, id, nb, na)
	m, err := pki.ParseMaterial(cert, key, bundle, spiffe)
	require.NoError(t, err)
	return m
}

func TestMaterialVerifiesInstanceURIs(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	m := material(t, ca, nil, web, ca.CertPEM())
	assert.Equal(t, web, m.Identity())
	peer := material(t, ca, nil, cache, ca.CertPEM())
	got, err := m.Verify(peer.Chain(), x509.ExtKeyUsageServerAuth)
	require.NoError(t, err)
	assert.Equal(t, cache, got)

	// A certificate from another CA is refused, whatever it names.
	other := credstest.NewCA(t, "other")
	stranger := material(t, other, nil, cache, other.CertPEM())
	_, err = m.Verify(stranger.Chain(), x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "unknown authority")
	_, err = m.Verify(nil, x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "no certificate")

	// A bundle with both CAs trusts both (a CA rotation).
	both := material(t, ca, nil, web, credstest.Bundle(ca, other))
	_, err = both.Verify(stranger.Chain(), x509.ExtKeyUsageClientAuth)
	require.NoError(t, err)
}

func TestMaterialVerifiesSVIDs(t *testing.T) {
	ca := credstest.NewCA(t, "spiffe ca")
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	m := material(t, ca, spiffe, web, ca.CertPEM())
	assert.Equal(t, web, m.Identity())
	assert.Equal(t, "spiffe://example.org/ns/web/sa/web-1", m.Leaf().URIs[0].String())

	peer := material(t, ca, spiffe, cache, ca.CertPEM())
	got, err := m.Verify(peer.Chain(), x509.ExtKeyUsageClientAuth)
	require.NoError(t, err)
	assert.Equal(t, cache, got)

	// Same CA, another trust domain: refused, and said so.
	otherTD, err := pki.NewSPIFFEMapping("other.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	nb, na := hourFromNow()
	cert, key := credstest.Issue(t, ca, otherTD, cache, nb, na)
	foreign, err := tlsChain(cert, key)
	require.NoError(t, err)
	_, err = m.Verify(foreign, x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "peer's SPIFFE ID spiffe://other.org/ns/cache/sa/cache-0 is not in trust domain example.org")

	// Same CA and trust domain, a path outside the template: refused.
	otherPath, err := pki.NewSPIFFEMapping("example.org", "/workload/{iid}")
	require.NoError(t, err)
	cert, key = credstest.Issue(t, ca, otherPath, cache, nb, na)
	odd, err := tlsChain(cert, key)
	require.NoError(t, err)
	_, err = m.Verify(odd, x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "SPIFFE ID spiffe://example.org/workload/cache-0 does not match the ID template /ns/{role}/sa/{iid}")

	// A tcpproxy URI certificate is no SVID.
	plain := material(t, ca, nil, cache, ca.CertPEM())
	_, err = m.Verify(plain.Chain(), x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "is not an X.509 SVID")

	// An SVID of the right trust domain from an untrusted CA: refused.
	rogue := credstest.NewCA(t, "rogue")
	cert, key = credstest.Issue(t, rogue, spiffe, cache, nb, na)
	forged, err := tlsChain(cert, key)
	require.NoError(t, err)
	_, err = m.Verify(forged, x509.ExtKeyUsageClientAuth)
	require.ErrorContains(t, err, "unknown authority")
}

func tlsChain(certPEM, _ []byte) ([]*x509.Certificate, error) {
	b, _ := pem.Decode(certPEM)
	c, err := x509.ParseCertificate(b.Bytes)
	return []*x509.Certificate{c}, err
}

func TestParseMaterialRefuses(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	other := credstest.NewCA(t, "other")
	now := time.Now()
	good, goodKey := credstest.Issue(t, ca, nil, web, now.Add(-time.Minute), now.Add(time.Hour))
	_, otherKey := credstest.Issue(t, ca, nil, web, now.Add(-time.Minute), now.Add(time.Hour))
	expired, expiredKey := credstest.Issue(t, ca, nil, web, now.Add(-2*time.Hour), now.Add(-time.Hour))
	early, earlyKey := credstest.Issue(t, ca, nil, web, now.Add(time.Hour), now.Add(2*time.Hour))
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/{role}/{iid}")
	require.NoError(t, err)
	for _, tc := range []struct {
		name          string
		cert, key, ca []byte
		spiffe        *pki.SPIFFEMapping
		want          string
	}{
		{"key of another certificate", good, otherKey, ca.CertPEM(), nil, "private key does not match public key"},
		{"half-written certificate", good[:len(good)/2], goodKey, ca.CertPEM(), nil, "certificate and key"},
		{"empty CA bundle", good, goodKey, nil, nil, "CA bundle: holds no PEM certificate"},
		{"expired", expired, expiredKey, ca.CertPEM(), nil, "expired at"},
		{"not yet valid", early, earlyKey, ca.CertPEM(), nil, "is not valid yet"},
		{"certificate from another CA", good, goodKey, other.CertPEM(), nil, "does not verify against the CA bundle"},
		{"tcpproxy certificate where SVIDs are wanted", good, goodKey, ca.CertPEM(), spiffe, "not an X.509 SVID"},
	} {
		_, err := pki.ParseMaterial(tc.cert, tc.key, tc.ca, tc.spiffe)
		require.ErrorContains(t, err, tc.want, tc.name)
	}
}

// TestParseMaterialKeyEncodings: keys as cert-manager writes them by
// default (SEC 1 for ECDSA) load as well as PKCS #8, also for SVIDs.
func TestParseMaterialKeyEncodings(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/{role}/{iid}")
	require.NoError(t, err)
	nb, na := hourFromNow()
	cert, keyPEM := credstest.Issue(t, ca, spiffe, web, nb, na)
	b, _ := pem.Decode(keyPEM)
	key, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	require.NoError(t, err)
	sec1, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	require.NoError(t, err)
	m, err := pki.ParseMaterial(cert, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}), ca.CertPEM(), spiffe)
	require.NoError(t, err)
	assert.Equal(t, web, m.Identity())
}

func TestCheckValidity(t *testing.T) {
	now := time.Now()
	c := &x509.Certificate{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}
	require.NoError(t, pki.CheckValidity(c, now))
	require.ErrorContains(t, pki.CheckValidity(c, now.Add(2*time.Hour)), "expired at")
	require.ErrorContains(t, pki.CheckValidity(c, now.Add(-2*time.Hour)), "not valid yet")
}

func TestNewMaterialNeedsAKey(t *testing.T) {
	_, err := pki.NewMaterial(tls.Certificate{}, nil, nil)
	require.ErrorContains(t, err, "no certificate or no private key")
}
