package channels

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/cpu"

	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// swapCreds are credentials a test rotates by hand.
type swapCreds struct{ p atomic.Pointer[pki.Material] }

func (s *swapCreds) Current() *pki.Material { return s.p.Load() }

func newSwapCreds(m *pki.Material) *swapCreds {
	s := &swapCreds{}
	s.p.Store(m)
	return s
}

func mat(t testing.TB, ca *pki.CA, iid string, bundle ...*pki.CA) *pki.Material {
	t.Helper()
	cert, key := credstest.Issue(t, ca, nil, pki.Identity{IID: iid, Role: "test"}, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	m, err := pki.ParseMaterial(cert, key, credstest.Bundle(bundle...), nil)
	require.NoError(t, err)
	return m
}

// tlsEnd is the TLS side of a node, without the rest of it.
func tlsEnd(cr pki.Credentials) *Node { return &Node{tls: newTLSState(cr)} }

type handshakeResult struct {
	dialed   *tls.Conn
	dialErr  error
	accepted pki.Identity
	resumed  bool // on the accepting side
	accErr   error
}

// handshake connects client to server over TCP on 127.0.0.1 and runs the
// TLS handshakes of a dial to want and of the accept.
func handshake(t testing.TB, ln net.Listener, client, server *Node, want string) handshakeResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var r handshakeResult
	var wg sync.WaitGroup
	wg.Go(func() {
		raw, err := ln.Accept()
		if err != nil {
			r.accErr = err
			return
		}
		tc, id, err := server.tlsAccept(ctx, raw)
		r.accepted, r.accErr = id, err
		if err != nil {
			raw.Close()
			return
		}
		r.resumed = tc.ConnectionState().DidResume
		// A byte for the client to read, and with it the session ticket
		// that follows the handshake; then wait for it to be done.
		_, _ = tc.Write([]byte{1})
		_, _ = tc.Read(make([]byte, 1))
		tc.Close()
	})
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	r.dialed, r.dialErr = client.tlsDial(ctx, raw, Member{IID: want, Role: "test"})
	if r.dialErr == nil {
		_, r.dialErr = r.dialed.Read(make([]byte, 1))
	}
	raw.Close()
	wg.Wait()
	return r
}

func listen(t testing.TB) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// recordingCache notes whether a TLS session was offered for resumption.
type recordingCache struct {
	tls.ClientSessionCache
	offered atomic.Bool
}

func (c *recordingCache) Get(key string) (*tls.ClientSessionState, bool) {
	cs, ok := c.ClientSessionCache.Get(key)
	if ok && cs != nil {
		c.offered.Store(true)
	}
	return cs, ok
}

// TestResumptionChecksIdentity: a resumed session is held to the identity
// checks of a full one. A ticket from b offered when dialing c resumes
// (the server accepts its own ticket) but the dialer refuses: the session
// is for b.
func TestResumptionChecksIdentity(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	a, b := tlsEnd(mat(t, ca, "a", ca)), tlsEnd(mat(t, ca, "b", ca))
	ln := listen(t)
	r := handshake(t, ln, a, b, "b")
	require.NoError(t, r.dialErr)
	require.NoError(t, r.accErr)
	assert.False(t, r.dialed.ConnectionState().DidResume)
	r = handshake(t, ln, a, b, "b")
	require.NoError(t, r.dialErr)
	assert.True(t, r.dialed.ConnectionState().DidResume, "the second dial resumes")
	assert.True(t, r.resumed)
	assert.Equal(t, pki.Identity{IID: "a", Role: "test"}, r.accepted, "the resumed session still names its client")
	if cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ || cpu.ARM64.HasAES {
		// TLS 1.3 prefers AES-GCM where the CPU accelerates it.
		assert.Equal(t, "TLS_AES_128_GCM_SHA256", tls.CipherSuiteName(r.dialed.ConnectionState().CipherSuite))
	}

	g, err := a.tls.current()
	require.NoError(t, err)
	cs, ok := g.tickets.Get("b")
	require.True(t, ok)
	rec := &recordingCache{ClientSessionCache: g.tickets}
	g.tickets = rec
	rec.Put("c", cs)
	r = handshake(t, ln, a, b, "c")
	assert.True(t, rec.offered.Load(), "b's ticket was offered for c")
	require.ErrorContains(t, r.dialErr, `certificate is for instance "b" (role "test"), not instance "c"`)
}

// TestResumptionAcrossCADrop: after a rotation that drops the old CA,
// sessions established under it do not resume, on either side, even when
// the ticket survives: verification against the current bundle fails
// closed.
func TestResumptionAcrossCADrop(t *testing.T) {
	ca1, ca2 := credstest.NewCA(t, "ca1"), credstest.NewCA(t, "ca2")
	credsA := newSwapCreds(mat(t, ca1, "a", ca1))
	credsB := newSwapCreds(mat(t, ca1, "b", ca1))
	a, b := tlsEnd(credsA), tlsEnd(credsB)
	ln := listen(t)
	// Fixed ticket keys, so that the server would decrypt old tickets
	// after its rotation (it makes new keys itself).
	key := [32]byte{1, 2, 3}
	gb, err := b.tls.current()
	require.NoError(t, err)
	gb.server.SetSessionTicketKeys([][32]byte{key})
	require.NoError(t, handshake(t, ln, a, b, "b").dialErr)
	r := handshake(t, ln, a, b, "b")
	require.NoError(t, r.dialErr)
	require.True(t, r.dialed.ConnectionState().DidResume)
	oldA, err := a.tls.current()
	require.NoError(t, err)
	ticket, ok := oldA.tickets.Get("b")
	require.True(t, ok)

	// The dialer drops ca1. A new generation starts without tickets: a
	// full handshake, which refuses b's ca1 certificate.
	credsA.p.Store(mat(t, ca2, "a", ca2))
	r = handshake(t, ln, a, b, "b")
	require.ErrorContains(t, r.dialErr, "unknown authority")
	// The old ticket carried over by hand: resumption is attempted and
	// refused.
	newA, err := a.tls.current()
	require.NoError(t, err)
	require.NotSame(t, oldA, newA)
	rec := &recordingCache{ClientSessionCache: newA.tickets}
	newA.tickets = rec
	rec.Put("b", ticket)
	r = handshake(t, ln, a, b, "b")
	assert.True(t, rec.offered.Load())
	require.ErrorContains(t, r.dialErr, "unknown authority")

	// The listener rotates while the dialer still holds its ca1
	// certificate and a ticket. With the ticket keys kept, the ticket
	// resumes while ca1 is in the listener's bundle...
	credsA.p.Store(oldA.mat)
	a.tls.gen.Store(oldA)
	oldA.tickets.Put("b", ticket)
	rotateB := func(m *pki.Material) {
		credsB.p.Store(m)
		gb, err := b.tls.current()
		require.NoError(t, err)
		gb.server.SetSessionTicketKeys([][32]byte{key})
	}
	rotateB(mat(t, ca2, "b", ca1, ca2))
	r = handshake(t, ln, a, b, "b")
	require.NoError(t, r.accErr)
	require.True(t, r.resumed)
	// ...and is refused by the listener once ca1 is gone.
	rotateB(mat(t, ca2, "b", ca2))
	r = handshake(t, ln, a, b, "b")
	require.ErrorContains(t, r.accErr, "unknown authority")
	require.Error(t, r.dialErr)
}

// BenchmarkTLSHandshake measures a session's TLS handshake over TCP on
// 127.0.0.1, both sides: in full (key exchange, ECDSA P-256 signatures
// and their verification both ways) and resumed from a ticket (key
// exchange only). cpu-ns/op is the CPU time of the process (both sides,
// the TCP connection included) per handshake, steadier than wall time on
// a shared machine.
func BenchmarkTLSHandshake(b *testing.B) {
	ca := credstest.NewCA(b, "ca")
	client, server := tlsEnd(mat(b, ca, "a", ca)), tlsEnd(mat(b, ca, "b", ca))
	ln := listen(b)
	for _, resume := range []bool{false, true} {
		name := "full"
		if resume {
			name = "resumed"
		}
		b.Run(name, func(b *testing.B) {
			g, err := client.tls.current()
			require.NoError(b, err)
			if resume {
				require.NoError(b, handshake(b, ln, client, server, "b").dialErr) // a ticket
			}
			var ru0 syscall.Rusage
			require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru0))
			for b.Loop() {
				if !resume {
					g.tickets.Put("b", nil)
				}
				r := handshake(b, ln, client, server, "b")
				if r.dialErr != nil || r.accErr != nil {
					b.Fatal(r.dialErr, r.accErr)
				}
				if got := r.dialed.ConnectionState().DidResume; got != resume {
					b.Fatalf("resumed %v", got)
				}
			}
			var ru syscall.Rusage
			require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
			cpu := ru.Utime.Nano() + ru.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano()
			b.ReportMetric(float64(cpu)/float64(b.N), "cpu-ns/op")
		})
	}
}
