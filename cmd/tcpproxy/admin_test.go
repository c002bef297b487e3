package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

func TestAdminValidation(t *testing.T) {
	for _, ok := range []string{"", "127.0.0.1:0", "127.0.0.1:6060"} {
		assert.NoError(t, validateAdmin(ok), ok)
	}
	for _, bad := range []string{"0.0.0.0:6060", ":6060", "localhost:6060", "127.0.0.2:6060", "10.0.0.1:6060", "[::1]:6060", "127.0.0.1"} {
		assert.Error(t, validateAdmin(bad), bad)
	}
	_, err := parseConfig([]byte("iid: a\nrole: r\nlisten: x:1\nadmin: 0.0.0.0:6060\nchannels:\n  db: {kind: reply, port: 1}\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "127.0.0.1 only")
	cfg, err := parseConfig([]byte("iid: a\nrole: r\nlisten: 127.0.0.1:1\nadmin: 127.0.0.1:6060\nchannels:\n  db: {kind: reply, port: 1}\n"))
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1:6060", cfg.Admin)
}

func TestAdminEndpoint(t *testing.T) {
	srv := httptest.NewServer(adminMux(newObserver("t")))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/debug/vars")
	require.NoError(t, err)
	defer resp.Body.Close()
	var v adminVars
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&v))
	assert.Positive(t, v.Goroutines)
	assert.Positive(t, v.Sys)

	resp2, err := http.Get(srv.URL + "/debug/pprof/goroutine?debug=1")
	require.NoError(t, err)
	defer resp2.Body.Close()
	body, err := io.ReadAll(resp2.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, resp2.StatusCode)
	assert.Contains(t, string(body), "goroutine profile")

	stop, err := startAdmin("127.0.0.1:0", slog.New(slog.DiscardHandler), newObserver("t"))
	require.NoError(t, err)
	stop()
}

func TestAdminHealthAndReadiness(t *testing.T) {
	o := newObserver("t")
	srv := httptest.NewServer(adminMux(o))
	defer srv.Close()
	status := func(path string) int {
		resp, err := http.Get(srv.URL + path)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	assert.Equal(t, http.StatusOK, status("/healthz"))
	assert.Equal(t, http.StatusServiceUnavailable, status("/readyz"))
	o.ready.Store(true)
	assert.Equal(t, http.StatusOK, status("/readyz"))
	assert.Equal(t, http.StatusOK, status("/metrics"))
}

// TestAdminSecurityMetrics: /metrics shows whether the transport is
// insecure and counts refusals by side and reason, each from 0.
func TestAdminSecurityMetrics(t *testing.T) {
	o := newObserver("t")
	srv := httptest.NewServer(adminMux(o))
	defer srv.Close()
	scrape := func() string {
		resp, err := http.Get(srv.URL + "/metrics")
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return string(body)
	}
	m := scrape()
	assert.Contains(t, m, `tcpproxy_transport_insecure{iid="t"} 0`)
	assert.Contains(t, m, `tcpproxy_handshake_refused_total{iid="t",reason="not_member",side="accept"} 0`)
	assert.Contains(t, m, `tcpproxy_stream_refused_total{iid="t",reason="forbidden"} 0`)

	o.transport.SetInsecure(true)
	on := o.onRefused()
	for range 3 {
		on(channels.Refusal{Reason: channels.RefusedNotMember})
	}
	on(channels.Refusal{Dialed: true, Reason: channels.RefusedPlaintext})
	on(channels.Refusal{Stream: true, Reason: channels.RefusedForbidden})
	m = scrape()
	assert.Contains(t, m, `tcpproxy_transport_insecure{iid="t"} 1`)
	assert.Contains(t, m, `tcpproxy_handshake_refused_total{iid="t",reason="not_member",side="accept"} 3`)
	assert.Contains(t, m, `tcpproxy_handshake_refused_total{iid="t",reason="plaintext",side="dial"} 1`)
	assert.Contains(t, m, `tcpproxy_stream_refused_total{iid="t",reason="forbidden"} 1`)
}
