package pki_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// node is a certificate and its key, for building chains by hand.
type node struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// certOpts is what sign puts in a certificate.
type certOpts struct {
	ca                  bool
	uris                []string
	eku                 []x509.ExtKeyUsage
	notBefore, notAfter time.Time
}

// sign makes a certificate by o, signed by parent (self-signed if nil).
func sign(t *testing.T, parent *node, name string, o certOpts) *node {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	if o.notBefore.IsZero() {
		o.notBefore, o.notAfter = hourFromNow()
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    o.notBefore,
		NotAfter:     o.notAfter,
		ExtKeyUsage:  o.eku,
	}
	if o.ca {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	for _, u := range o.uris {
		pu, err := url.Parse(u)
		require.NoError(t, err)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	require.NoError(t, err)
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &node{c, key}
}

var both = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}

// TestVerifyOddCertificates: chains a hostile peer may present are
// refused with the reason, and those the standards allow are taken.
func TestVerifyOddCertificates(t *testing.T) {
	root := sign(t, nil, "root", certOpts{ca: true})
	self := sign(t, root, "self", certOpts{uris: []string{web.URI().String()}, eku: both})
	m, err := pki.NewMaterial(tlsCert(self, root), []*x509.Certificate{root.cert}, nil)
	require.NoError(t, err)
	cacheURI := cache.URI().String()
	past := time.Now().Add(-48 * time.Hour)

	inter := sign(t, root, "intermediate", certOpts{ca: true})
	expiredInter := sign(t, root, "expired intermediate", certOpts{ca: true, notBefore: past, notAfter: past.Add(time.Hour)})
	deep := []*node{root}
	for range 12 {
		deep = append(deep, sign(t, deep[len(deep)-1], "level", certOpts{ca: true}))
	}

	for _, tc := range []struct {
		name  string
		chain []*node // leaf first
		usage x509.ExtKeyUsage
		want  string // "" when it verifies as cache
	}{
		{"plain", []*node{sign(t, root, "c", certOpts{uris: []string{cacheURI}, eku: both})}, x509.ExtKeyUsageClientAuth, ""},
		{"no URI SAN", []*node{sign(t, root, "c", certOpts{eku: both})}, x509.ExtKeyUsageClientAuth, "names no tcpproxy instance"},
		{"two instance URIs", []*node{sign(t, root, "c", certOpts{uris: []string{cacheURI, web.URI().String()}, eku: both})},
			x509.ExtKeyUsageClientAuth, "names 2 tcpproxy instances"},
		{"other URIs beside", []*node{sign(t, root, "c", certOpts{uris: []string{"https://example.org/x", cacheURI}, eku: both})},
			x509.ExtKeyUsageClientAuth, ""},
		{"server-only EKU as client", []*node{sign(t, root, "c", certOpts{uris: []string{cacheURI}, eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})},
			x509.ExtKeyUsageClientAuth, "incompatible key usage"},
		{"client-only EKU as server", []*node{sign(t, root, "c", certOpts{uris: []string{cacheURI}, eku: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})},
			x509.ExtKeyUsageServerAuth, "incompatible key usage"},
		{"expired leaf", []*node{sign(t, root, "c", certOpts{uris: []string{cacheURI}, eku: both, notBefore: past, notAfter: past.Add(time.Hour)})},
			x509.ExtKeyUsageClientAuth, "expired"},
		{"through an intermediate", []*node{sign(t, inter, "c", certOpts{uris: []string{cacheURI}, eku: both}), inter}, x509.ExtKeyUsageClientAuth, ""},
		{"intermediate left out", []*node{sign(t, inter, "c", certOpts{uris: []string{cacheURI}, eku: both})}, x509.ExtKeyUsageClientAuth, "unknown authority"},
		{"expired intermediate", []*node{sign(t, expiredInter, "c", certOpts{uris: []string{cacheURI}, eku: both}), expiredInter},
			x509.ExtKeyUsageClientAuth, "expired"},
		{"leaf signing a leaf", func() []*node {
			leaf := sign(t, root, "c", certOpts{uris: []string{"tcpproxy://instance/x"}, eku: both})
			return []*node{sign(t, leaf, "c2", certOpts{uris: []string{cacheURI}, eku: both}), leaf}
		}(), x509.ExtKeyUsageClientAuth, "unknown authority"},
		{"twelve intermediates", append([]*node{sign(t, deep[len(deep)-1], "c", certOpts{uris: []string{cacheURI}, eku: both})}, reverse(deep[1:])...),
			x509.ExtKeyUsageClientAuth, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var chain []*x509.Certificate
			for _, n := range tc.chain {
				chain = append(chain, n.cert)
			}
			got, err := m.Verify(chain, tc.usage)
			if tc.want != "" {
				require.ErrorContains(t, err, tc.want)
				return
			}
			require.NoError(t, err)
			require.Equal(t, cache, got)
		})
	}
}

func reverse(ns []*node) []*node {
	out := make([]*node, len(ns))
	for i, n := range ns {
		out[len(ns)-1-i] = n
	}
	return out
}

// tlsCert is n's certificate and key, presented with chain.
func tlsCert(n *node, chain ...*node) tls.Certificate {
	c := tls.Certificate{Certificate: [][]byte{n.cert.Raw}, PrivateKey: n.key}
	for _, p := range chain {
		c.Certificate = append(c.Certificate, p.cert.Raw)
	}
	return c
}
