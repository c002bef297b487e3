package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/creds/credstest"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

func TestTLSConfigErrors(t *testing.T) {
	const head = "iid: web-1\nrole: web\nlisten: 127.0.0.1:1\nchannels:\n  db: {kind: reply, port: 1}\n"
	const files = "cert: c.pem, key: k.pem, ca: ca.pem, "
	// spiffe is a tls.spiffe block in flow style: templates are quoted,
	// as {} are YAML's own there.
	spiffe := func(td, template, more string) string {
		return fmt.Sprintf("spiffe: {trustDomain: %q, idTemplate: %q%s}", td, template, more)
	}
	for _, tc := range []struct{ name, tls, want string }{
		{"half files", "cert: c.pem", "tls: cert, key and ca are all needed for mutual TLS"},
		{"poll without files", "poll: 1s", "tls: poll and expiryWarning apply to cert, key and ca, which are not set"},
		{"no trust domain", files + spiffe("", "/{iid}", ""), "tls.spiffe.trustDomain: missing"},
		{"SPIFFE ID as trust domain", files + spiffe("spiffe://example.org", "/{iid}", ""), `tls.spiffe.trustDomain: trust domain "spiffe://example.org": give the name only`},
		{"bad trust domain", files + spiffe("Example.ORG", "/{iid}", ""), `tls.spiffe.trustDomain: trust domain "Example.ORG"`},
		{"no template", files + spiffe("example.org", "", ""), "tls.spiffe.idTemplate: missing"},
		{"template without iid", files + spiffe("example.org", "/ns/{role}", ""), `tls.spiffe.idTemplate: ID template "/ns/{role}": has no {iid} segment`},
		{"placeholder inside a segment", files + spiffe("example.org", "/sa-{iid}", ""), "must be a whole path segment"},
		{"spiffe without material", spiffe("example.org", "/{iid}", ""), "tls.spiffe: needs tls.cert, tls.key and tls.ca"},
		{"socket and files", files + spiffe("example.org", "/{iid}", ", socket: /run/agent.sock"), "tls.spiffe.socket: the SVID, its key and the trust bundle come from the Workload API; remove tls.cert"},
		{"socket not a URI", spiffe("example.org", "/{iid}", ", socket: 'http://x'"), `tls.spiffe.socket: "http://x"`},
		{"poll with socket", "poll: 1s, " + spiffe("example.org", "/{iid}", ", socket: /run/agent.sock"), "tls.poll: applies to files"},
		{"unknown field", files + spiffe("example.org", "/{iid}", ", template: x"), "tls.spiffe.template (line 6): unknown field; expected one of idTemplate, socket, trustDomain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte(head + "tls: {" + tc.tls + "}\n"))
			require.ErrorContains(t, err, tc.want)
		})
	}
	// This instance's iid must fit a SPIFFE ID path.
	_, err := parseConfig([]byte(strings.Replace(head, "web-1", "web/1", 1) + "tls: {" + files + spiffe("example.org", "/{role}/{iid}", "") + "}\n"))
	require.ErrorContains(t, err, `tls.spiffe.idTemplate: this instance has no SPIFFE ID under /{role}/{iid}: iid "web/1" cannot be a SPIFFE ID path segment`)
	_, err = parseConfig([]byte(head + "members: {etcd: {endpoints: [https://e:2379], tls: {" + files + spiffe("example.org", "/{iid}", "") + "}}}\n"))
	require.ErrorContains(t, err, "members.etcd.tls.spiffe: not supported")

	for _, good := range []string{
		"tls: {" + files + "poll: 10s, expiryWarning: 72h}",
		"tls: {" + files + spiffe("example.org", "/ns/{role}/sa/{iid}", "") + "}",
		"tls: {" + spiffe("example.org", "/{iid}", ", socket: unix:///run/spire/agent.sock") + "}",
		"tls: {" + spiffe("example.org", "/{iid}", ", socket: /run/spire/agent.sock") + "}",
		// Block style, as docs/tls.md shows it: the template needs no quotes.
		"tls:\n  cert: c.pem\n  key: k.pem\n  ca: ca.pem\n  spiffe:\n    trustDomain: example.org\n    idTemplate: /ns/{role}/sa/{iid}",
	} {
		cfg, err := parseConfig([]byte(head + good + "\n"))
		require.NoError(t, err, good)
		if cfg.TLS.SPIFFE != nil {
			assert.Contains(t, cfg.TLS.SPIFFE.IDTemplate, "{iid}")
		}
	}
}

// TestCertsSPIFFE: `tcpproxy certs -spiffe` makes X.509 SVIDs that load
// under the mapping it prints.
func TestCertsSPIFFE(t *testing.T) {
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	code := realMain([]string{"certs", "-dir", dir, "-spiffe", "example.org", "-spiffe-template", "/ns/{role}/sa/{iid}", "web-1:web"}, &out, &errOut)
	require0(t, code, out.String()+errOut.String())
	assert.Contains(t, out.String(), `spiffe: {trustDomain: example.org, idTemplate: "/ns/{role}/sa/{iid}"}`)
	m, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	mat, err := pki.LoadMaterial(filepath.Join(dir, "web-1.pem"), filepath.Join(dir, "web-1-key.pem"), filepath.Join(dir, "ca.pem"), m)
	require.NoError(t, err)
	assert.Equal(t, pki.Identity{IID: "web-1", Role: "web"}, mat.Identity())
	assert.Equal(t, "spiffe://example.org/ns/web/sa/web-1", mat.Leaf().URIs[0].String())

	code = realMain([]string{"certs", "-dir", dir, "-spiffe", "example.org", "web 1:web"}, &out, &errOut)
	assert.NotEqual(t, 0, code)
	assert.Contains(t, errOut.String(), `iid "web 1" cannot be a SPIFFE ID path segment`)
}

// TestTwoProcessesTLSRotation runs two proxy processes over mutual TLS
// with X.509 SVIDs kept in Kubernetes-style secret volumes, and rotates
// both to a new CA while they run: HTTP keeps flowing, and the client's
// metrics show the rotation and the new certificate's expiry.
func TestTwoProcessesTLSRotation(t *testing.T) {
	const port = 18081
	ca1, ca2 := credstest.NewCA(t, "ca1"), credstest.NewCA(t, "ca2")
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	srvID, cliID := pki.Identity{IID: "srv-1", Role: "server"}, pki.Identity{IID: "cli-1", Role: "client"}
	srvSecret, cliSecret := credstest.NewSecretDir(t), credstest.NewSecretDir(t)
	srvSecret.Put(t, ca1, spiffe, srvID, ca1.CertPEM())
	cliSecret.Put(t, ca1, spiffe, cliID, ca1.CertPEM())
	tlsLine := func(sd *credstest.SecretDir) string {
		cert, key, ca := sd.Paths()
		return fmt.Sprintf("tls: {cert: %s, key: %s, ca: %s, poll: 1h, spiffe: {trustDomain: example.org, idTemplate: \"/ns/{role}/sa/{iid}\"}}\n", cert, key, ca)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	serverCfg, clientCfg := twoInstancesIn(t, t.TempDir(), "api", port, map[string]string{
		"srv-1": tlsLine(srvSecret), "cli-1": tlsLine(cliSecret) + "admin: " + admin + "\n",
	})
	server := startProc(t, []string{"TCPPROXY_TEST_LEGACY=http"}, "run", "-config", serverCfg, "--", os.Args[0])
	client := startProc(t, nil, "run", "-config", clientCfg)

	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(c assert.TestingT, url string) string {
		resp, err := hc.Get(url)
		if !assert.NoError(c, err) {
			return ""
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		assert.NoError(c, err)
		assert.Equal(c, http.StatusOK, resp.StatusCode)
		return string(b)
	}
	through := fmt.Sprintf("http://127.1.0.1:%d/", port)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Contains(c, get(c, through), "hello from srv-1")
	}, 20*time.Second, 50*time.Millisecond, "server log:\n%s\nclient log:\n%s", server.out, client.out)
	metric := func(c assert.TestingT, re string) string {
		m := regexp.MustCompile(re).FindStringSubmatch(get(c, "http://"+admin+"/metrics"))
		if !assert.Len(c, m, 2, re) {
			return ""
		}
		return m[1]
	}
	notAfter := func(c assert.TestingT) int64 {
		v, err := strconv.ParseFloat(metric(c, `tcpproxy_certificate_expiry_timestamp_seconds\{iid="cli-1"\} (\S+)`), 64)
		assert.NoError(c, err)
		return int64(v)
	}
	before := notAfter(t)
	assert.InDelta(t, time.Now().Add(time.Hour).Unix(), before, 120)

	// Both move to certificates from ca2, trusting ca1 and ca2; the new
	// client certificate outlives the old one.
	srvSecret.Put(t, ca2, spiffe, srvID, credstest.Bundle(ca1, ca2))
	cert, key := credstest.Issue(t, ca2, spiffe, cliID, time.Now().Add(-time.Minute), time.Now().Add(3*time.Hour))
	cliSecret.Update(t, map[string][]byte{credstest.CertFile: cert, credstest.KeyFile: key, credstest.CAFile: credstest.Bundle(ca1, ca2)})
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Equal(c, "1", metric(c, `tcpproxy_certificate_reloads_total\{iid="cli-1",result="ok"\} (\S+)`))
		assert.Greater(c, notAfter(c), before+3600)
	}, 10*time.Second, 20*time.Millisecond, "client log:\n%s", client.out)
	assert.Equal(t, "0", metric(t, `tcpproxy_certificate_reloads_total\{iid="cli-1",result="error"\} (\S+)`))
	assert.Contains(t, get(t, through), "hello from srv-1")
	require.Eventually(t, func() bool { return strings.Contains(server.out.String(), "TLS credentials rotated") },
		10*time.Second, 20*time.Millisecond, "server log:\n%s", server.out)

	for _, log := range []string{client.stop(t), server.stop(t)} {
		assert.Contains(t, log, "TLS credentials loaded")
		assert.Contains(t, log, "uri=spiffe://example.org/ns/")
		assert.NotContains(t, log, "level=ERROR")
	}
}

// TestTLSStartErrors: credentials that cannot serve stop the start with
// the reason (creds' tests go through every reason) and where they came
// from.
func TestTLSStartErrors(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	self := pki.Identity{IID: "web-1", Role: "web"}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sd := credstest.NewSecretDir(t)
	cert, key := credstest.Issue(t, ca, nil, self, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	sd.Update(t, map[string][]byte{credstest.CertFile: cert, credstest.KeyFile: key, credstest.CAFile: ca.CertPEM()})
	c, k, a := sd.Paths()
	_, err := tlsConfig{Cert: c, Key: k, CA: a}.transportCredentials(t.Context(), self, log)
	require.ErrorContains(t, err, "tls: credentials from "+c)
	require.ErrorContains(t, err, "expired at")

	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	_, err = tlsConfig{SPIFFE: &spiffeConfig{TrustDomain: "example.org", IDTemplate: "/{iid}", Socket: sock}}.transportCredentials(ctx, self, log)
	require.ErrorContains(t, err, "tls.spiffe.socket: workload API unix://"+sock+": first SVID")
}
