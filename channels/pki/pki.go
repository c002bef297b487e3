// Package pki ties TLS certificates to tcpproxy instances.
//
// An instance certificate names its instance in a URI SAN, either
// tcpproxy's own
//
//	tcpproxy://instance/<iid>?role=<role>
//
// (iid path-escaped, role query-escaped), or a SPIFFE ID that a
// SPIFFEMapping turns into an iid and role, so that X.509 SVIDs from SPIRE
// or cert-manager's csi-driver-spiffe serve unchanged. With mutual TLS a
// node accepts a session only when the peer's certificate chains to the
// mesh CA bundle and names the iid and role the peer declares in its
// handshake (and, when dialing, the member it meant to reach), so a
// certificate cannot be used to impersonate another instance.
//
// Material is one generation of an instance's credentials (its
// certificate, the CA bundle and the naming scheme); Credentials hand out
// the current one, so that certificates rotate without a restart. The
// package also makes a development CA and instance certificates
// (`tcpproxy certs`).
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const uriScheme, uriHost = "tcpproxy", "instance"

// Identity is the instance a certificate was issued to.
type Identity struct {
	IID  string
	Role string
}

func (id Identity) String() string { return fmt.Sprintf("instance %q (role %q)", id.IID, id.Role) }

// URI is the SAN that names id in a certificate.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: uriScheme, Host: uriHost, Path: "/" + id.IID, RawQuery: "role=" + url.QueryEscape(id.Role)}
}

// ErrNoIdentity is returned for a certificate that names no instance.
var ErrNoIdentity = errors.New("certificate names no tcpproxy instance")

// IdentityOf returns the instance named by cert's URI SAN.
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	var found []Identity
	for _, u := range cert.URIs {
		if u.Scheme != uriScheme || u.Host != uriHost {
			continue
		}
		found = append(found, Identity{IID: strings.TrimPrefix(u.Path, "/"), Role: u.Query().Get("role")})
	}
	switch len(found) {
	case 0:
		return Identity{}, fmt.Errorf("%w (subject %q)", ErrNoIdentity, cert.Subject.CommonName)
	case 1:
		return found[0], nil
	}
	return Identity{}, fmt.Errorf("certificate %q names %d tcpproxy instances; want exactly one", cert.Subject.CommonName, len(found))
}

// Check verifies that cert's tcpproxy URI names want (see Match).
func Check(cert *x509.Certificate, want Identity) error {
	got, err := IdentityOf(cert)
	if err != nil {
		return err
	}
	return Match(got, want)
}

// Match checks that certified, the instance a verified certificate names,
// is want. Roles are compared when both state one: a dialer may not know a
// member's role, and a SPIFFE ID template without {role} attests only the
// instance.
func Match(certified, want Identity) error {
	if certified.IID != want.IID || (certified.Role != "" && want.Role != "" && certified.Role != want.Role) {
		return fmt.Errorf("certificate is for %s, not %s", certified, want)
	}
	return nil
}

// CA is a certificate authority that issues instance certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a self-signed ECDSA P-256 CA valid for validity.
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Issue makes a certificate for id, named by its tcpproxy URI, usable as
// TLS server and client, valid for validity. hosts (DNS names or IPs) are
// added as SANs for tools that check host names; tcpproxy itself checks
// only the identity.
func (ca *CA) Issue(id Identity, hosts []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	now := time.Now()
	return ca.IssueCert(CertSpec{URI: id.URI(), Name: id.IID, Unit: id.Role, Hosts: hosts, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(validity)})
}

// IssueSVID makes an X.509 SVID for id, named by its SPIFFE ID under m,
// like Issue otherwise.
func (ca *CA) IssueSVID(m *SPIFFEMapping, id Identity, hosts []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	sid, err := m.ID(id)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	return ca.IssueCert(CertSpec{URI: sid.URL(), Name: id.IID, Unit: id.Role, Hosts: hosts, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(validity)})
}

// CertSpec is what IssueCert puts in a certificate.
type CertSpec struct {
	URI                 *url.URL // the identity: the only URI SAN
	Name, Unit          string   // subject common name and organizational unit
	Hosts               []string // DNS names or IPs
	NotBefore, NotAfter time.Time
}

// IssueCert makes a leaf certificate by spec, usable as TLS server and
// client, with a new ECDSA P-256 key (PKCS #8).
func (ca *CA) IssueCert(spec CertSpec) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("key for %s: %w", spec.URI, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: spec.Name},
		NotBefore:    spec.NotBefore,
		NotAfter:     spec.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{spec.URI},
	}
	if spec.Unit != "" {
		tmpl.Subject.OrganizationalUnit = []string{spec.Unit}
	}
	for _, h := range spec.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("certificate for %s: %w", spec.URI, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// CertPEM is the CA certificate in PEM.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// Save writes ca.pem and ca-key.pem into dir (the key mode 0600).
func (ca *CA) Save(dir string) error {
	keyDER, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM(), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "ca-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
}

// LoadCA reads ca.pem and ca-key.pem from dir.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("load CA from %s: not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load CA certificate: %w", err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load CA key: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// WriteInstance issues a certificate for id and writes <iid>.pem and
// <iid>-key.pem into dir; it returns their paths.
func (ca *CA) WriteInstance(dir string, id Identity, hosts []string, validity time.Duration) (certFile, keyFile string, err error) {
	certPEM, keyPEM, err := ca.Issue(id, hosts, validity)
	if err != nil {
		return "", "", err
	}
	return writePair(dir, id, certPEM, keyPEM)
}

// WriteSVID is WriteInstance for an X.509 SVID under m.
func (ca *CA) WriteSVID(dir string, m *SPIFFEMapping, id Identity, hosts []string, validity time.Duration) (certFile, keyFile string, err error) {
	certPEM, keyPEM, err := ca.IssueSVID(m, id, hosts, validity)
	if err != nil {
		return "", "", err
	}
	return writePair(dir, id, certPEM, keyPEM)
}

func writePair(dir string, id Identity, certPEM, keyPEM []byte) (certFile, keyFile string, err error) {
	base := strings.NewReplacer("/", "_", string(filepath.Separator), "_").Replace(id.IID)
	certFile, keyFile = filepath.Join(dir, base+".pem"), filepath.Join(dir, base+"-key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
