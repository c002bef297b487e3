package channels_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/creds"
	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// watch returns credentials that follow sd for instance iid (role test).
func watch(t *testing.T, sd *credstest.SecretDir, iid string, spiffe *pki.SPIFFEMapping) *creds.Files {
	t.Helper()
	cert, key, ca := sd.Paths()
	self := pki.Identity{IID: iid, Role: "test"}
	f, err := creds.WatchFiles(creds.FilesConfig{Cert: cert, Key: key, CA: ca, SPIFFE: spiffe, Poll: time.Hour,
		Options: creds.Options{Self: &self, Logger: testLogger()}})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, f.Close()) })
	return f
}

// secret makes a SecretDir holding a certificate for iid from ca and the
// CA bundle of cas.
func secret(t *testing.T, ca *pki.CA, spiffe *pki.SPIFFEMapping, iid string, cas ...*pki.CA) *credstest.SecretDir {
	sd := credstest.NewSecretDir(t)
	sd.Put(t, ca, spiffe, pki.Identity{IID: iid, Role: "test"}, credstest.Bundle(cas...))
	return sd
}

// client starts node iid with a request channel "svc" to member b, over
// TCP, with the credentials given.
func client(t *testing.T, iid string, b *channels.Node, cr pki.Credentials) channels.RequestChannel {
	cfg := baseConfig(iid, channels.PlainTCPTransport(), membership.Static(member(b, "b", map[string]uint16{"svc": 80})))
	cfg.ListenAddr = ""
	cfg.TLS = cr
	var req channels.RequestChannel
	startNode(t, cfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	return req
}

// presented returns the certificate a node listening at addr presents to
// a TLS client that shows cr's certificate.
func presented(t *testing.T, addr string, cr pki.Credentials) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{
		MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, // only looking
		Certificates: []tls.Certificate{*cr.Current().Certificate()},
	})
	require.NoError(t, err)
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// pattern is the byte at offset i of the test stream.
func pattern(i int64) byte { return byte(i % 251) }

// TestTLSRotationUnderTraffic swaps certificates and CAs the way
// Kubernetes updates secret volumes while a stream carries data: first to
// a bundle of old and new CA with the listener's certificate from the new
// CA, then to the new CA alone. The stream never stops or loses a byte;
// new sessions present the new certificate and are verified against the
// new bundle, so a node still holding an old-CA certificate is refused.
func TestTLSRotationUnderTraffic(t *testing.T) {
	ca1, ca2 := credstest.NewCA(t, "ca1"), credstest.NewCA(t, "ca2")
	sdA, sdB := secret(t, ca1, nil, "a", ca1), secret(t, ca1, nil, "b", ca1)
	credsA, credsB := watch(t, sdA, "a", nil), watch(t, sdB, "b", nil)
	req, reply, _, b := pair(t, channels.PlainTCPTransport(), func(c *channels.Config) {
		if c.IID == "a" {
			c.TLS = credsA
		} else {
			c.TLS = credsB
		}
	})
	s, in := open(t, req, reply)
	defer s.Close()
	defer in.Stream.Close()
	assert.Equal(t, "ca1", presented(t, b.Addr(), credsA).Issuer.CommonName)

	// Traffic until stop; the reader checks every byte.
	var sent atomic.Int64
	stop := make(chan struct{})
	wrote := make(chan error, 1)
	go func() {
		buf := make([]byte, 32<<10)
		for {
			select {
			case <-stop:
				wrote <- s.CloseWrite()
				return
			default:
			}
			off := sent.Load()
			for i := range buf {
				buf[i] = pattern(off + int64(i))
			}
			if _, err := s.Write(buf); err != nil {
				wrote <- err
				return
			}
			sent.Add(int64(len(buf)))
		}
	}()
	read := make(chan error, 1)
	var received atomic.Int64
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := in.Stream.Read(buf)
			off := received.Load()
			for i := range n {
				if buf[i] != pattern(off+int64(i)) {
					read <- errors.New("corrupt byte")
					return
				}
			}
			received.Add(int64(n))
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				read <- err
				return
			}
		}
	}()
	flowing := func() {
		t.Helper()
		mark := received.Load()
		require.Eventually(t, func() bool { return received.Load() > mark+1<<20 }, 10*time.Second, time.Millisecond, "traffic stalled")
	}
	flowing()

	// Step 1: both trust old and new CA; b's certificate is from the new.
	sdA.Put(t, ca1, nil, pki.Identity{IID: "a", Role: "test"}, credstest.Bundle(ca1, ca2))
	sdB.Put(t, ca2, nil, pki.Identity{IID: "b", Role: "test"}, credstest.Bundle(ca1, ca2))
	require.Eventually(t, func() bool { return credsA.Stats().Reloads == 1 && credsB.Stats().Reloads == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, "ca2", presented(t, b.Addr(), credsA).Issuer.CommonName, "a new session presents the new certificate")
	// A newcomer from the new CA only reaches b.
	c := client(t, "c", b, watch(t, secret(t, ca2, nil, "c", ca2), "c", nil))
	sc, inc := open(t, c, reply)
	require.NoError(t, sc.Close())
	require.NoError(t, inc.Stream.Close())
	flowing()

	// Step 2: the old CA is gone from every bundle.
	sdA.Put(t, ca2, nil, pki.Identity{IID: "a", Role: "test"}, ca2.CertPEM())
	sdB.Put(t, ca2, nil, pki.Identity{IID: "b", Role: "test"}, ca2.CertPEM())
	require.Eventually(t, func() bool { return credsA.Stats().Reloads == 2 && credsB.Stats().Reloads == 2 }, 5*time.Second, time.Millisecond)
	stale := client(t, "d", b, watch(t, secret(t, ca1, nil, "d", ca1, ca2), "d", nil))
	_, _, err := stale.Open(context.Background(), channels.Header{})
	require.ErrorIs(t, err, channels.ErrNoMembers)
	require.ErrorContains(t, err, "bad certificate", "b refuses a certificate from the dropped CA")
	flowing()

	close(stop)
	require.NoError(t, <-wrote)
	require.NoError(t, <-read)
	assert.Equal(t, sent.Load(), received.Load())
	assert.Greater(t, received.Load(), int64(3<<20))
}

// TestTLSResumption: a dialer that lost its sessions resumes TLS on
// reconnecting instead of a full handshake, and the resumed session is
// still bound to the identities (the accepted stream's peer is a, and a
// reached b).
func TestTLSResumption(t *testing.T) {
	ca, files := writeCerts(t, t.TempDir(), "a", "b")
	req, reply, a, b := pair(t, channels.PlainTCPTransport(), useCerts(t, ca, files))
	s, in := open(t, req, reply)
	require.NoError(t, s.Close())
	require.NoError(t, in.Stream.Close())
	// The first stream's session dials the next of the peer's sessions in
	// the background: wait for it, so that no handshake lands after the
	// count below and no session outlives DropSessions.
	require.Eventually(t, func() bool { return a.NumSessions("b") == channels.DefaultSessionsPerPeer }, 5*time.Second, time.Millisecond)
	full, resumed := a.TLSHandshakes()
	require.GreaterOrEqual(t, full, uint64(1))

	a.DropSessions("b")
	require.Eventually(t, func() bool { return a.NumSessions("b") == 0 }, 5*time.Second, time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, m, err := req.Open(ctx, channels.Header{SourcePort: 7})
	require.NoError(t, err)
	defer s.Close()
	assert.Equal(t, "b", m.IID)
	in, err = reply.Accept(ctx)
	require.NoError(t, err)
	defer in.Stream.Close()
	assert.Equal(t, "a", in.Peer.IID)
	_, err = s.Write([]byte("after resumption"))
	require.NoError(t, err)
	buf := make([]byte, 16)
	_, err = io.ReadFull(in.Stream, buf)
	require.NoError(t, err)
	assert.Equal(t, "after resumption", string(buf))

	full2, resumed2 := a.TLSHandshakes()
	assert.Equal(t, full, full2, "no full handshake on reconnecting")
	assert.Greater(t, resumed2, resumed, "the reconnect resumed")
	_, bResumed := b.TLSHandshakes()
	assert.Positive(t, bResumed)
}

// TestTLSSPIFFE: nodes with X.509 SVIDs of the trust domain, mapped to
// instances by the ID template, talk; a client whose SVID is of another
// trust domain, or outside the template, is refused with that reason,
// even though its certificate is from the same CA.
func TestTLSSPIFFE(t *testing.T) {
	// Refusals from one address after the first are logged in a summary
	// per interval: make it short, the test waits for each reason.
	defer channels.SetRefusalLogInterval(10 * time.Millisecond)()
	ca := credstest.NewCA(t, "spiffe ca")
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	var bLog logBuffer
	req, reply, _, b := pair(t, channels.PlainTCPTransport(), func(c *channels.Config) {
		c.TLS = watch(t, secret(t, ca, spiffe, c.IID, ca), c.IID, spiffe)
		if c.IID == "b" {
			c.Logger = slog.New(slog.NewTextHandler(&bLog, nil))
		}
	})
	s, in := open(t, req, reply)
	require.NoError(t, s.Close())
	require.NoError(t, in.Stream.Close())
	assert.Equal(t, "a", in.Peer.IID)
	mesh := watch(t, secret(t, ca, spiffe, "e", ca), "e", spiffe)
	assert.Equal(t, "spiffe://example.org/ns/test/sa/b", presented(t, b.Addr(), mesh).URIs[0].String())

	for _, tc := range []struct{ name, td, template, want string }{
		{"another trust domain", "other.org", "/ns/{role}/sa/{iid}", "peer's SPIFFE ID spiffe://other.org/ns/test/sa/x is not in trust domain example.org"},
		{"a path outside the template", "example.org", "/workload/{iid}", "SPIFFE ID spiffe://example.org/workload/x does not match the ID template /ns/{role}/sa/{iid}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			theirs, err := pki.NewSPIFFEMapping(tc.td, tc.template)
			require.NoError(t, err)
			certPEM, keyPEM := credstest.Issue(t, ca, theirs, pki.Identity{IID: "x", Role: "test"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			require.NoError(t, err)
			conn, err := tls.Dial("tcp", b.Addr(), &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
			if err == nil {
				// TLS 1.3: the server's verdict on the client comes after
				// the client's side of the handshake.
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			require.ErrorContains(t, err, "bad certificate")
			require.Eventually(t, func() bool { return bLog.contains(tc.want) }, 5*time.Second, time.Millisecond)
		})
	}
}

// logBuffer collects a node's log output.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.buf.String(), s)
}
