package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels/creds"
)

type fixedCert creds.Stats

func (f fixedCert) Stats() creds.Stats { return creds.Stats(f) }

func TestCertificates(t *testing.T) {
	c := NewCertificates("web-1", fixedCert{NotAfter: time.Unix(1893456000, 0), Reloads: 3, Failures: 1})
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	want := `
# HELP tcpproxy_certificate_expiry_timestamp_seconds When the TLS certificate in use expires (its NotAfter), in seconds since the Unix epoch.
# TYPE tcpproxy_certificate_expiry_timestamp_seconds gauge
tcpproxy_certificate_expiry_timestamp_seconds{iid="web-1"} 1.893456e+09
# HELP tcpproxy_certificate_reloads_total TLS credential reloads after the first load, by result: ok (new handshakes use them) or error (refused; the previous ones stay in use).
# TYPE tcpproxy_certificate_reloads_total counter
tcpproxy_certificate_reloads_total{iid="web-1",result="error"} 1
tcpproxy_certificate_reloads_total{iid="web-1",result="ok"} 3
`
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(want)))
}
