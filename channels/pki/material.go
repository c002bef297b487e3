package pki

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Credentials supply the mutual-TLS material of new handshakes. Current is
// called once per handshake, so it must be cheap and safe for concurrent
// use; it returns a different *Material once the credentials rotate, and
// never nil. A *Material is itself Credentials that never change.
type Credentials interface {
	Current() *Material
}

// Material is one generation of an instance's mutual-TLS credentials: the
// certificate it presents, as server and as client, and the trust roots and
// naming scheme by which it verifies peers. It is immutable; credentials
// rotate by replacing it.
//
// Peers are named either by tcpproxy's own instance URI SAN (see
// Identity.URI) or, with a SPIFFEMapping, by X.509 SVIDs of one trust
// domain. Host names are not checked: members are addressed by IP, and
// what a session must be bound to is the instance.
type Material struct {
	cert   tls.Certificate     // Leaf set
	chain  []*x509.Certificate // cert.Certificate parsed
	roots  []*x509.Certificate
	pool   *x509.CertPool
	spiffe *SPIFFEMapping     // nil: tcpproxy instance URIs
	bundle *x509bundle.Bundle // the trust domain's roots, with spiffe
	self   Identity

	verified verifiedCache
}

// NewMaterial checks cert (chain and private key) and returns the material
// that presents it and trusts roots. spiffe nil names instances by
// tcpproxy URIs; otherwise by SPIFFE IDs through the mapping, and cert must
// be an X.509 SVID. The certificate must be valid now, name an instance and
// chain to roots, or peers sharing those roots would refuse it.
func NewMaterial(cert tls.Certificate, roots []*x509.Certificate, spiffe *SPIFFEMapping) (*Material, error) {
	if len(cert.Certificate) == 0 || cert.PrivateKey == nil {
		return nil, errors.New("certificate: no certificate or no private key")
	}
	if len(roots) == 0 {
		return nil, errors.New("CA bundle: no certificate")
	}
	m := &Material{cert: cert, roots: roots, pool: x509.NewCertPool(), spiffe: spiffe}
	for _, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("certificate: %w", err)
		}
		m.chain = append(m.chain, c)
	}
	m.cert.Leaf = m.chain[0]
	if err := CheckValidity(m.cert.Leaf, time.Now()); err != nil {
		return nil, err
	}
	for _, r := range roots {
		m.pool.AddCert(r)
	}
	if spiffe != nil {
		if err := checkSVID(cert); err != nil {
			return nil, err
		}
		m.bundle = x509bundle.FromX509Authorities(spiffe.TrustDomain(), roots)
	}
	var err error
	if m.self, err = m.Identify(m.cert.Leaf); err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := m.Verify(m.chain, usage); err != nil {
			return nil, fmt.Errorf("certificate does not verify against the CA bundle: %w", err)
		}
	}
	return m, nil
}

// checkSVID checks that cert is an X.509 SVID (go-spiffe's rules: one
// SPIFFE ID URI SAN, a leaf that is no CA, a key that matches).
func checkSVID(cert tls.Certificate) error {
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return fmt.Errorf("private key: %w", err)
	}
	if _, err := x509svid.ParseRaw(bytes.Join(cert.Certificate, nil), key); err != nil {
		return fmt.Errorf("certificate is not an X.509 SVID: %w", err)
	}
	return nil
}

// ParseMaterial is NewMaterial with the certificate chain, its private key
// (PKCS#8, PKCS#1 or SEC 1) and the CA bundle in PEM. The bundle may hold
// several CAs, such as the old and the new one while a CA rotates.
func ParseMaterial(certPEM, keyPEM, caPEM []byte, spiffe *SPIFFEMapping) (*Material, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate and key: %w", err)
	}
	roots, err := parseCertificates(caPEM)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	return NewMaterial(cert, roots, spiffe)
}

// LoadMaterial is ParseMaterial with the PEM read from files.
func LoadMaterial(certFile, keyFile, caFile string, spiffe *SPIFFEMapping) (*Material, error) {
	var data [3][]byte
	for i, f := range []string{certFile, keyFile, caFile} {
		var err error
		if data[i], err = os.ReadFile(f); err != nil {
			return nil, err
		}
	}
	m, err := ParseMaterial(data[0], data[1], data[2], spiffe)
	if err != nil {
		return nil, fmt.Errorf("%s, %s, %s: %w", certFile, keyFile, caFile, err)
	}
	return m, nil
}

// MaterialFromSVID returns the material that presents svid and trusts
// bundles' roots for spiffe's trust domain.
func MaterialFromSVID(svid *x509svid.SVID, bundles x509bundle.Source, spiffe *SPIFFEMapping) (*Material, error) {
	if svid == nil || len(svid.Certificates) == 0 {
		return nil, errors.New("no X.509 SVID")
	}
	if !svid.ID.MemberOf(spiffe.TrustDomain()) {
		return nil, fmt.Errorf("SVID %s is not in trust domain %s", svid.ID, spiffe.TrustDomain().Name())
	}
	b, err := bundles.GetX509BundleForTrustDomain(spiffe.TrustDomain())
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	cert := tls.Certificate{PrivateKey: svid.PrivateKey}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return NewMaterial(cert, b.X509Authorities(), spiffe)
}

func parseCertificates(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("holds no PEM certificate")
	}
	return out, nil
}

// CheckValidity says, in an operator's terms, why cert is not valid at now.
func CheckValidity(cert *x509.Certificate, now time.Time) error {
	switch {
	case now.Before(cert.NotBefore):
		return fmt.Errorf("certificate %s is not valid yet: valid from %s, %s from now (check the clock)",
			describe(cert), cert.NotBefore.UTC().Format(time.RFC3339), cert.NotBefore.Sub(now).Round(time.Second))
	case now.After(cert.NotAfter):
		return fmt.Errorf("certificate %s expired at %s, %s ago",
			describe(cert), cert.NotAfter.UTC().Format(time.RFC3339), now.Sub(cert.NotAfter).Round(time.Second))
	}
	return nil
}

// describe names cert in messages: by its URI SAN when it has one.
func describe(cert *x509.Certificate) string {
	if len(cert.URIs) > 0 {
		return cert.URIs[0].String()
	}
	return fmt.Sprintf("%q", cert.Subject.CommonName)
}

// Current returns m: a Material is Credentials that never rotate.
func (m *Material) Current() *Material { return m }

// Certificate is the chain and key to present; its Leaf is set.
func (m *Material) Certificate() *tls.Certificate { return &m.cert }

// Chain is the certificate chain presented, leaf first.
func (m *Material) Chain() []*x509.Certificate { return m.chain }

// Leaf is the certificate presented.
func (m *Material) Leaf() *x509.Certificate { return m.cert.Leaf }

// Identity is the instance the presented certificate names.
func (m *Material) Identity() Identity { return m.self }

// Roots is the CA bundle, for clients that verify servers by host name
// (a registry, say) rather than by instance.
func (m *Material) Roots() *x509.CertPool { return m.pool }

// SPIFFE is the SPIFFE mapping peers are named by, nil for tcpproxy URIs.
func (m *Material) SPIFFE() *SPIFFEMapping { return m.spiffe }

// Identify returns the instance cert names, without verifying it.
func (m *Material) Identify(cert *x509.Certificate) (Identity, error) {
	if m.spiffe == nil {
		return IdentityOf(cert)
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return Identity{}, fmt.Errorf("certificate %s is not an X.509 SVID: %w", describe(cert), err)
	}
	return m.spiffe.Identity(id)
}

// Verify verifies a peer's chain (leaf first, as received) against the
// CA bundle at the current time, and returns the instance it names. usage
// is the extended key usage the leaf must allow (server when dialing,
// client when accepting); X.509 SVIDs are verified by go-spiffe's rules,
// which leave key usage to the issuer.
//
// A chain verified once is remembered, within its validity, for as long
// as the Material lives (the bundle cannot change under it): a peer that
// reconnects, or resumes a TLS session, pays for hashing its chain rather
// than for the signature checks.
func (m *Material) Verify(chain []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, error) {
	if len(chain) == 0 {
		return Identity{}, errors.New("peer presented no certificate")
	}
	now := time.Now()
	key := verifiedKey(chain, usage)
	if id, ok := m.verified.get(key, now); ok {
		return id, nil
	}
	id, chains, err := m.verify(chain, usage)
	if err != nil {
		return Identity{}, err
	}
	m.verified.put(key, id, chains[0])
	return id, nil
}

func (m *Material) verify(chain []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, [][]*x509.Certificate, error) {
	leaf := chain[0]
	if m.spiffe != nil {
		id, err := x509svid.IDFromCert(leaf)
		if err != nil {
			return Identity{}, nil, fmt.Errorf("peer certificate %s is not an X.509 SVID: %w", describe(leaf), err)
		}
		// Name the trust domain in the error rather than the missing bundle.
		if !id.MemberOf(m.spiffe.TrustDomain()) {
			return Identity{}, nil, fmt.Errorf("peer's SPIFFE ID %s is not in trust domain %s", id, m.spiffe.TrustDomain().Name())
		}
		_, chains, err := x509svid.Verify(chain, m.bundle)
		if err != nil {
			return Identity{}, nil, fmt.Errorf("peer certificate %s: %w", id, err)
		}
		got, err := m.spiffe.Identity(id)
		return got, chains, err
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: m.pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err != nil {
		return Identity{}, nil, fmt.Errorf("peer certificate %s: %w", describe(leaf), err)
	}
	got, err := IdentityOf(leaf)
	return got, chains, err
}

// verifiedCap bounds the chains a Material remembers; when full, it
// forgets them all. Only chains that verified are remembered, so filling
// it takes many certificates from the mesh's own CAs.
const verifiedCap = 1024

// verifiedCache remembers chains that verified, with the instance they
// name and the period in which every certificate of the chain is valid.
type verifiedCache struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]verifiedChain
}

type verifiedChain struct {
	id                  Identity
	notBefore, notAfter time.Time
}

func verifiedKey(chain []*x509.Certificate, usage x509.ExtKeyUsage) [sha256.Size]byte {
	h := sha256.New()
	_ = binary.Write(h, binary.BigEndian, int64(usage))
	for _, c := range chain {
		_ = binary.Write(h, binary.BigEndian, uint64(len(c.Raw)))
		h.Write(c.Raw)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

func (c *verifiedCache) get(key [sha256.Size]byte, now time.Time) (Identity, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[key]
	if !ok || now.Before(v.notBefore) || now.After(v.notAfter) {
		return Identity{}, false
	}
	return v.id, true
}

func (c *verifiedCache) put(key [sha256.Size]byte, id Identity, chain []*x509.Certificate) {
	v := verifiedChain{id: id, notBefore: chain[0].NotBefore, notAfter: chain[0].NotAfter}
	for _, cert := range chain[1:] {
		if cert.NotBefore.After(v.notBefore) {
			v.notBefore = cert.NotBefore
		}
		if cert.NotAfter.Before(v.notAfter) {
			v.notAfter = cert.NotAfter
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= verifiedCap {
		c.m = make(map[[sha256.Size]byte]verifiedChain)
	}
	c.m[key] = v
}
