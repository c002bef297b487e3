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
