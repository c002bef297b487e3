package channels

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// TLSConfigFromFiles loads static mutual-TLS credentials for Config.TLS:
// the certificate in certFile/keyFile (PEM) presented both as server and
// as client, and the CA bundle in caFile that peers' certificates must
// chain to; peers are named by tcpproxy instance URIs. Credentials that
// follow rotated files come from package channels/creds.
func TLSConfigFromFiles(certFile, keyFile, caFile string) (pki.Credentials, error) {
	m, err := pki.LoadMaterial(certFile, keyFile, caFile, nil)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	return m, nil
}

// ticketCacheSize bounds the TLS sessions a node keeps for resumption: one
// per peer instance it dials.
const ticketCacheSize = 4096

// tlsState makes the TLS configurations of a node's handshakes from its
// credentials, one generation per pki.Material: a rotation takes effect on
// the next handshake, sessions already up keep running, and resumption
// state never outlives the material it was established under.
//
// Peers are verified in VerifyConnection, which crypto/tls calls on full
// and resumed handshakes alike, against the generation's CA bundle: a
// session resumed from a ticket is held to the same chain and identity
// checks as a new one, so a CA dropped from the bundle cannot come back
// through resumption.
type tlsState struct {
	creds pki.Credentials

	mu  sync.Mutex // serialises making a generation
	gen atomic.Pointer[tlsGen]

	full, resumed atomic.Uint64 // completed handshakes
}

// tlsGen is the TLS configuration of one generation of credentials.
type tlsGen struct {
	mat *pki.Material
	// server serves every accepted connection; crypto/tls rotates its
	// session ticket keys daily, and a new generation starts with new
	// ones, so tickets issued before a rotation no longer resume.
	server *tls.Config
	// client is cloned for each dial, to check the member dialed.
	client *tls.Config
	// tickets holds the TLS sessions of this generation by peer iid.
	tickets tls.ClientSessionCache
}

func newTLSState(creds pki.Credentials) *tlsState {
	if creds == nil {
		return nil
	}
	return &tlsState{creds: creds}
}

// current returns the generation of the credentials' current material.
func (t *tlsState) current() (*tlsGen, error) {
	mat := t.creds.Current()
	if mat == nil {
		return nil, errors.New("tls: credentials have no certificate")
	}
	if g := t.gen.Load(); g != nil && g.mat == mat {
		return g, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if g := t.gen.Load(); g != nil && g.mat == mat {
		return g, nil
	}
	g := newTLSGen(mat)
	t.gen.Store(g)
	return g, nil
}

func newTLSGen(mat *pki.Material) *tlsGen {
	cert := *mat.Certificate()
	return &tlsGen{
		mat: mat,
		server: &tls.Config{
			// Every node runs the same code: there is no older peer to
			// accommodate. TLS 1.3 picks AES-GCM when the CPU has AES
			// instructions and ChaCha20-Poly1305 otherwise.
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			// Any certificate is asked for; VerifyConnection verifies it.
			ClientAuth: tls.RequireAnyClientCert,
			VerifyConnection: func(cs tls.ConnectionState) error {
				_, err := mat.Verify(cs.PeerCertificates, x509.ExtKeyUsageClientAuth)
				return err
			},
		},
		client: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			// Peers are authenticated by the instance their certificate
			// names, not by host name (members are addressed by IP):
			// VerifyConnection, set per dial, does the whole check.
			InsecureSkipVerify: true,
		},
		tickets: tls.NewLRUClientSessionCache(ticketCacheSize),
	}
}

// tlsDial runs the client side of the TLS handshake on raw, to member m: the
// server's certificate must chain to the current CA bundle and name m.
func (n *Node) tlsDial(ctx context.Context, raw net.Conn, m Member) (*tls.Conn, error) {
	g, err := n.tls.current()
	if err != nil {
		return nil, err
	}
	want := pki.Identity{IID: m.IID, Role: m.Role}
	cfg := g.client.Clone()
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		got, err := g.mat.Verify(cs.PeerCertificates, x509.ExtKeyUsageServerAuth)
		if err != nil {
			return err
		}
		return pki.Match(got, want)
	}
	cfg.ClientSessionCache = memberTickets{g.tickets, m.IID}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	n.tls.count(tc)
	return tc, nil
}

// tlsAccept runs the server side of the TLS handshake on raw and returns
// the instance the client's certificate names, verified against the
// current CA bundle.
func (n *Node) tlsAccept(ctx context.Context, raw net.Conn) (*tls.Conn, pki.Identity, error) {
	g, err := n.tls.current()
	if err != nil {
		return nil, pki.Identity{}, err
	}
	tc := tls.Server(raw, g.server)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, pki.Identity{}, fmt.Errorf("tls: %w", err)
	}
	n.tls.count(tc)
	// The chain was verified by VerifyConnection; only the name is left.
	id, err := g.mat.Identify(tc.ConnectionState().PeerCertificates[0])
	if err != nil {
		return nil, pki.Identity{}, fmt.Errorf("tls: %w", err)
	}
	return tc, id, nil
}

func (t *tlsState) count(tc *tls.Conn) {
	if tc.ConnectionState().DidResume {
		t.resumed.Add(1)
	} else {
		t.full.Add(1)
	}
}

// memberTickets keeps a dial's TLS session under the peer's iid: a ticket
// is for the instance, however it is reached (TCP or the same-host
// socket), and is never offered to another.
type memberTickets struct {
	c   tls.ClientSessionCache
	iid string
}

func (t memberTickets) Get(string) (*tls.ClientSessionState, bool) { return t.c.Get(t.iid) }
func (t memberTickets) Put(_ string, cs *tls.ClientSessionState)   { t.c.Put(t.iid, cs) }
