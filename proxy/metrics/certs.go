package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tcpproxy/tcpproxy/channels/creds"
)

// CertificateSource is what Certificates reads; the credentials of
// package channels/creds implement it.
type CertificateSource interface {
	Stats() creds.Stats
}

// Certificates exposes the TLS certificate an instance presents: when it
// expires, and how its rotations went.
type Certificates struct {
	src     CertificateSource
	expiry  *prometheus.Desc
	reloads *prometheus.Desc
}

// NewCertificates returns the certificate metrics of instance iid.
func NewCertificates(iid string, src CertificateSource) *Certificates {
	labels := prometheus.Labels{"iid": iid}
	return &Certificates{
		src: src,
		expiry: prometheus.NewDesc("tcpproxy_certificate_expiry_timestamp_seconds",
			"When the TLS certificate in use expires (its NotAfter), in seconds since the Unix epoch.", nil, labels),
		reloads: prometheus.NewDesc("tcpproxy_certificate_reloads_total",
			"TLS credential reloads after the first load, by result: ok (new handshakes use them) or error (refused; the previous ones stay in use).",
			[]string{"result"}, labels),
	}
}

// Describe implements prometheus.Collector.
func (c *Certificates) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.expiry
	ch <- c.reloads
}

// Collect implements prometheus.Collector.
func (c *Certificates) Collect(ch chan<- prometheus.Metric) {
	st := c.src.Stats()
	ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, float64(st.NotAfter.Unix()))
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(st.Reloads), "ok")
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(st.Failures), "error")
}
