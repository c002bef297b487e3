// Package credstest helps tests of rotating credentials: a directory
// updated the way Kubernetes updates a mounted secret, and certificates
// issued on demand.
package credstest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// File names in a SecretDir, as cert-manager names them in a secret.
const (
	CertFile = "tls.crt"
	KeyFile  = "tls.key"
	CAFile   = "ca.crt"
)

// SecretDir is a directory laid out as the kubelet lays out a secret
// volume: the files are symbolic links name -> ..data/name, ..data is a
// link to a timestamped directory holding the contents, and an update
// writes a new timestamped directory and renames a new link over ..data,
// one atomic swap for all the files.
type SecretDir struct {
	Dir string
	n   int
}

// NewSecretDir makes an empty SecretDir in a test's temporary directory.
func NewSecretDir(t testing.TB) *SecretDir {
	return &SecretDir{Dir: t.TempDir()}
}

// Paths returns the paths of the certificate, key and CA files.
func (s *SecretDir) Paths() (cert, key, ca string) {
	return filepath.Join(s.Dir, CertFile), filepath.Join(s.Dir, KeyFile), filepath.Join(s.Dir, CAFile)
}

// Update replaces the contents by files (name to contents) in one atomic
// swap, and removes the previous contents.
func (s *SecretDir) Update(t testing.TB, files map[string][]byte) {
	t.Helper()
	s.n++
	ts := fmt.Sprintf("..2026_01_01_00_00_%02d.%d", s.n%60, s.n)
	require.NoError(t, os.Mkdir(filepath.Join(s.Dir, ts), 0o755))
	for name, data := range files {
		require.NoError(t, os.WriteFile(filepath.Join(s.Dir, ts, name), data, 0o600))
	}
	data := filepath.Join(s.Dir, "..data")
	old, _ := os.Readlink(data)
	tmp := filepath.Join(s.Dir, "..data_tmp")
	require.NoError(t, os.Symlink(ts, tmp))
	require.NoError(t, os.Rename(tmp, data))
	for name := range files {
		link := filepath.Join(s.Dir, name)
		if _, err := os.Lstat(link); os.IsNotExist(err) {
			require.NoError(t, os.Symlink(filepath.Join("..data", name), link))
		}
	}
	if old != "" {
		require.NoError(t, os.RemoveAll(filepath.Join(s.Dir, old)))
	}
}

// Put issues a certificate for id from ca (an X.509 SVID under spiffe,
// when not nil), valid for an hour, and puts it, its key and bundle (the
// CA bundle, PEM) in s in one swap.
func (s *SecretDir) Put(t testing.TB, ca *pki.CA, spiffe *pki.SPIFFEMapping, id pki.Identity, bundle []byte) {
	t.Helper()
	cert, key := Issue(t, ca, spiffe, id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	s.Update(t, map[string][]byte{CertFile: cert, KeyFile: key, CAFile: bundle})
}

// Issue makes a certificate for id from ca, valid from notBefore to
// notAfter: an X.509 SVID under spiffe when not nil, a tcpproxy instance
// certificate otherwise.
func Issue(t testing.TB, ca *pki.CA, spiffe *pki.SPIFFEMapping, id pki.Identity, notBefore, notAfter time.Time) (certPEM, keyPEM []byte) {
	t.Helper()
	spec := pki.CertSpec{URI: id.URI(), Name: id.IID, Unit: id.Role, NotBefore: notBefore, NotAfter: notAfter}
	if spiffe != nil {
		sid, err := spiffe.ID(id)
		require.NoError(t, err)
		spec.URI = sid.URL()
	}
	certPEM, keyPEM, err := ca.IssueCert(spec)
	require.NoError(t, err)
	return certPEM, keyPEM
}

// NewCA makes a CA valid for a day.
func NewCA(t testing.TB, name string) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA(name, 24*time.Hour)
	require.NoError(t, err)
	return ca
}

// Bundle concatenates the CAs' certificates in PEM.
func Bundle(cas ...*pki.CA) []byte {
	var out []byte
	for _, ca := range cas {
		out = append(out, ca.CertPEM()...)
	}
	return out
}
