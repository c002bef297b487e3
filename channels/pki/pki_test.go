package pki

import (
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func parse(t *testing.T, certPEM []byte) *x509.Certificate {
	b, _ := pem.Decode(certPEM)
	require.NotNil(t, b)
	c, err := x509.ParseCertificate(b.Bytes)
	require.NoError(t, err)
	return c
}

func TestIssueAndIdentity(t *testing.T) {
	ca, err := NewCA("ca", time.Hour)
	require.NoError(t, err)
	for _, id := range []Identity{{"web-1", "web"}, {"odd/iid with space?&", "role=x&y"}} {
		certPEM, _, err := ca.Issue(id, []string{"127.0.0.1", "node.local"}, time.Hour)
		require.NoError(t, err)
		cert := parse(t, certPEM)
		got, err := IdentityOf(cert)
		require.NoError(t, err)
		assert.Equal(t, id, got)
		require.NoError(t, Check(cert, id))
		require.NoError(t, Check(cert, Identity{IID: id.IID}), "empty role matches any")
		require.ErrorContains(t, Check(cert, Identity{IID: "other", Role: id.Role}), `not instance "other"`)
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		_, err = cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		require.NoError(t, err)
	}
}

func TestNoIdentity(t *testing.T) {
	_, err := IdentityOf(&x509.Certificate{})
	require.ErrorIs(t, err, ErrNoIdentity)
}

func TestSaveLoadCA(t *testing.T) {
	dir := t.TempDir()
	ca, err := NewCA("ca", time.Hour)
	require.NoError(t, err)
	require.NoError(t, ca.Save(dir))
	back, err := LoadCA(dir)
	require.NoError(t, err)
	assert.True(t, ca.Cert.Equal(back.Cert))
	assert.True(t, ca.Key.Equal(back.Key))
	_, err = LoadCA(t.TempDir())
	require.ErrorContains(t, err, "load CA")
}

// TestVerifiedChainsRemembered: a chain that verified is not verified
// again while it is valid, per usage; one that failed is, every time.
func TestVerifiedChainsRemembered(t *testing.T) {
	ca, err := NewCA("ca", time.Hour)
	require.NoError(t, err)
	load := func(id Identity, caPEM []byte) *Material {
		certPEM, keyPEM, err := ca.Issue(id, nil, time.Hour)
		require.NoError(t, err)
		m, err := ParseMaterial(certPEM, keyPEM, caPEM, nil)
		require.NoError(t, err)
		return m
	}
	m := load(Identity{IID: "a", Role: "r"}, ca.CertPEM())
	peer := load(Identity{IID: "b", Role: "r"}, ca.CertPEM()).Chain()
	got, err := m.Verify(peer, x509.ExtKeyUsageClientAuth)
	require.NoError(t, err)
	assert.Equal(t, Identity{IID: "b", Role: "r"}, got)
	key := verifiedKey(peer, x509.ExtKeyUsageClientAuth)
	now := time.Now()
	id, ok := m.verified.get(key, now)
	require.True(t, ok)
	assert.Equal(t, got, id)
	_, ok = m.verified.get(verifiedKey(peer, x509.ExtKeyUsageServerAuth), now)
	assert.False(t, ok, "remembered per usage")
	_, ok = m.verified.get(key, peer[0].NotAfter.Add(time.Second))
	assert.False(t, ok, "not past the chain's expiry")
	_, ok = m.verified.get(key, ca.Cert.NotAfter.Add(time.Second))
	assert.False(t, ok, "not past the CA's expiry")

	other, err := NewCA("other", time.Hour)
	require.NoError(t, err)
	certPEM, keyPEM, err := other.Issue(Identity{IID: "x", Role: "r"}, nil, time.Hour)
	require.NoError(t, err)
	stranger, err := ParseMaterial(certPEM, keyPEM, other.CertPEM(), nil)
	require.NoError(t, err)
	before := len(m.verified.m)
	for range 2 {
		_, err = m.Verify(stranger.Chain(), x509.ExtKeyUsageClientAuth)
		require.ErrorContains(t, err, "unknown authority")
	}
	assert.Len(t, m.verified.m, before, "failures are not remembered")
}
