package creds

import (
	"bytes"
	"context"
	"encoding/pem"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// agent is a SPIFFE Workload API server, as a SPIRE agent serves it on
// its Unix socket: every X509-SVID stream gets the current response, then
// each one pushed.
type agent struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	addr string

	mu      sync.Mutex
	current *workload.X509SVIDResponse
	changed chan struct{} // closed and replaced on each push
}

func startAgent(t *testing.T) *agent {
	a := &agent{changed: make(chan struct{})}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(srv, a)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	a.addr = "unix://" + sock
	return a
}

// push makes resp the SVID and bundle every client is sent.
func (a *agent) push(resp *workload.X509SVIDResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.current = resp
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *agent) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		a.mu.Lock()
		resp, changed := a.current, a.changed
		a.mu.Unlock()
		if resp != nil {
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

// svidResponse issues an SVID for id in spiffe's trust domain from ca,
// valid from notBefore to notAfter, with the trust domain's bundle.
func svidResponse(t *testing.T, ca *pki.CA, spiffe *pki.SPIFFEMapping, id pki.Identity, notAfter time.Time, bundle ...*pki.CA) *workload.X509SVIDResponse {
	certPEM, keyPEM := credstest.Issue(t, ca, spiffe, id, time.Now().Add(-time.Hour), notAfter)
	sid, err := spiffe.ID(id)
	require.NoError(t, err)
	der := func(p []byte) []byte {
		b, _ := pem.Decode(p)
		require.NotNil(t, b)
		return b.Bytes
	}
	var roots bytes.Buffer
	for _, c := range bundle {
		roots.Write(c.Cert.Raw)
	}
	return &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId: sid.String(), X509Svid: der(certPEM), X509SvidKey: der(keyPEM), Bundle: roots.Bytes(),
	}}}
}

// TestWorkloadAPI: SVIDs and bundles come from the Workload API and
// rotate with it; an SVID that does not fit (another trust domain,
// another instance) leaves the previous one in use.
func TestWorkloadAPI(t *testing.T) {
	ca1, ca2 := credstest.NewCA(t, "ca1"), credstest.NewCA(t, "ca2")
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	otherTD, err := pki.NewSPIFFEMapping("other.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	a := startAgent(t)
	hour := time.Now().Add(time.Hour)
	a.push(svidResponse(t, ca1, spiffe, web, hour, ca1))

	var l logs
	self := web
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	w, err := WatchWorkload(ctx, WorkloadConfig{Addr: a.addr, SPIFFE: spiffe, Options: Options{Self: &self, Logger: l.logger()}})
	require.NoError(t, err)
	defer w.Close()
	first := w.Current()
	assert.Equal(t, web, first.Identity())
	assert.Equal(t, "spiffe://example.org/ns/web/sa/web-1", l.attr("loaded", "uri"))

	// The agent rotates the SVID to a new CA, with both CAs in the bundle.
	a.push(svidResponse(t, ca2, spiffe, web, hour, ca1, ca2))
	require.Eventually(t, func() bool { return w.Current() != first }, waitFor, tick)
	m := w.Current()
	assert.Equal(t, "ca2", m.Leaf().Issuer.CommonName)
	for _, ca := range []*pki.CA{ca1, ca2} {
		peer := issue(t, ca, spiffe, cache, ca.CertPEM())
		got, err := m.Verify(peer.Chain(), 0)
		require.NoError(t, err)
		assert.Equal(t, cache, got)
	}
	assert.Equal(t, uint64(1), w.Stats().Reloads)

	// Updates that do not fit are refused.
	a.push(svidResponse(t, ca2, otherTD, web, hour, ca2))
	require.Eventually(t, func() bool { return w.Stats().Failures == 1 }, waitFor, tick)
	assert.Contains(t, l.attr("not reloaded", "err"), "is not in trust domain example.org")
	a.push(svidResponse(t, ca2, spiffe, cache, hour, ca2))
	require.Eventually(t, func() bool { return w.Stats().Failures == 2 }, waitFor, tick)
	assert.Contains(t, l.attr("not reloaded", "err"), `certificate names instance "cache-0"`)
	assert.Same(t, m, w.Current())

	// The bundle alone changes: the old CA dropped.
	a.push(svidResponse(t, ca2, spiffe, web, hour, ca2))
	require.Eventually(t, func() bool { return w.Current() != m }, waitFor, tick)
	_, err = w.Current().Verify(issue(t, ca1, spiffe, cache, ca1.CertPEM()).Chain(), 0)
	require.ErrorContains(t, err, "unknown authority")
	assert.Equal(t, 0, l.count(slog.LevelError, ""))
}

func TestWorkloadAPIStartErrors(t *testing.T) {
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	var l logs
	// Nobody serves the socket: WatchWorkload gives up with ctx.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = WatchWorkload(ctx, WorkloadConfig{Addr: "unix://" + filepath.Join(t.TempDir(), "none.sock"), SPIFFE: spiffe, Options: Options{Logger: l.logger()}})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	_, err = WatchWorkload(context.Background(), WorkloadConfig{Addr: "http://x", SPIFFE: spiffe})
	require.ErrorContains(t, err, "workload API address")

	// The agent's SVID names another instance.
	ca := credstest.NewCA(t, "ca")
	a := startAgent(t)
	a.push(svidResponse(t, ca, spiffe, cache, time.Now().Add(time.Hour), ca))
	self := web
	ctx, cancel = context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	_, err = WatchWorkload(ctx, WorkloadConfig{Addr: a.addr, SPIFFE: spiffe, Options: Options{Self: &self, Logger: l.logger()}})
	require.ErrorContains(t, err, `certificate names instance "cache-0" (role "cache"), but this proxy is instance "web-1"`)
}
