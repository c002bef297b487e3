// Package metrics exposes a proxy's counters to Prometheus.
//
// The Collector reads the proxy's live counters at scrape time, so the
// data path pays nothing for metrics.
package metrics

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// StatsSource is what the Collector reads; *proxy.Proxy implements it.
type StatsSource interface {
	Stats() []proxy.ChannelStats
}

// Collector is a prometheus.Collector for one proxy instance.
type Collector struct {
	src StatsSource

	connections *prometheus.Desc
	active      *prometheus.Desc
	failed      *prometheus.Desc
	refused     *prometheus.Desc
	resets      *prometheus.Desc
	idle        *prometheus.Desc
	bytes       *prometheus.Desc
	members     *prometheus.Desc
}

// NewCollector returns a Collector for src; every series carries the
// instance id as a constant label.
func NewCollector(iid string, src StatsSource) *Collector {
	constLabels := prometheus.Labels{"iid": iid}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tcpproxy_"+name, help, append([]string{"channel", "kind"}, labels...), constLabels)
	}
	return &Collector{
		src:         src,
		connections: desc("connections_total", "Proxied connections taken (legacy connections accepted and streams accepted)."),
		active:      desc("connections_active", "Proxied connections open now."),
		failed:      desc("connections_failed_total", "Connections that could not be set up end to end (no member, legacy server down, ...)."),
		refused:     desc("connections_refused_total", "Connections turned away at the channel's connection limit."),
		resets:      desc("connections_reset_total", "Connections that ended with a reset or transport failure instead of a clean close."),
		idle:        desc("connections_idle_reset_total", "Connections reset by the channel's idle timeout."),
		bytes:       desc("bytes_total", "Bytes carried; direction out is from the legacy program into the mesh.", "direction"),
		members:     desc("members", "Duplex members known, the local instance included."),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.connections, c.active, c.failed, c.refused, c.resets, c.idle, c.bytes, c.members} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range c.src.Stats() {
		l := []string{st.Channel, string(st.Kind)}
		counter := func(d *prometheus.Desc, v int64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append(l, extra...)...)
		}
		counter(c.connections, st.Connections)
		counter(c.failed, st.Failed)
		counter(c.refused, st.Refused)
		counter(c.resets, st.Reset)
		counter(c.idle, st.IdleReset)
		counter(c.bytes, st.BytesOut, "out")
		counter(c.bytes, st.BytesIn, "in")
		ch <- prometheus.MustNewConstMetric(c.active, prometheus.GaugeValue, float64(st.Active), l...)
		if st.Kind == proxy.KindDuplex {
			ch <- prometheus.MustNewConstMetric(c.members, prometheus.GaugeValue, float64(st.Members), l...)
		}
	}
}

// Transport holds the metrics of the sessions between proxies.
type Transport struct {
	handshakes     *prometheus.HistogramVec
	refused        *prometheus.CounterVec
	streamsRefused *prometheus.CounterVec
	insecure       prometheus.Gauge
	sessions       *prometheus.Desc
	count          func() map[string]int
}

// refusalReasons are the reasons whose refusal counters are reported from
// the start, at 0, by side: the reasons each side can see.
var refusalReasons = map[string][]string{
	"accept": {channels.RefusedTimeout, channels.RefusedProtocol, channels.RefusedTLS, channels.RefusedIdentity,
		channels.RefusedSelf, channels.RefusedNotMember, channels.RefusedRole, channels.RefusedPlaintext, channels.RefusedAddress, channels.RefusedOverload},
	"dial":   {channels.RefusedPlaintext, channels.RefusedIdentity, channels.RefusedPeer},
	"stream": {channels.RefusedTimeout, channels.RefusedProtocol, channels.RefusedSource, channels.RefusedChannel, channels.RefusedForbidden, channels.RefusedBacklog},
}

// sessionNets are the networks whose session gauge is always reported,
// at 0 when none is live, so that dashboards see the series.
var sessionNets = []string{"tcp", "unix"}

// NewTransport returns the session metrics of instance iid; sessions
// reports the live sessions by network at scrape time
// (channels.Node.SessionsByNet).
func NewTransport(iid string, sessions func() map[string]int) *Transport {
	labels := prometheus.Labels{"iid": iid}
	t := &Transport{
		handshakes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "tcpproxy_handshake_seconds",
			Help:        "Session handshakes (TCP or TLS connect and tcpproxy hello) by side (dial or accept) and result (ok or error).",
			ConstLabels: labels,
			Buckets:     prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5 ms .. 4 s
		}, []string{"side", "result"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "tcpproxy_handshake_refused_total",
			Help:        "Sessions refused, by side (accept: a peer dialed; dial: this proxy dialed) and reason (see the security documentation).",
			ConstLabels: labels,
		}, []string{"side", "reason"}),
		streamsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "tcpproxy_stream_refused_total",
			Help:        "Streams from peers refused (reset), by reason.",
			ConstLabels: labels,
		}, []string{"reason"}),
		insecure: prometheus.NewGauge(prometheus.GaugeOpts{
			Name:        "tcpproxy_transport_insecure",
			Help:        "1 when sessions without TLS are allowed with proxies on other hosts (transport.insecure), else 0.",
			ConstLabels: labels,
		}),
		sessions: prometheus.NewDesc("tcpproxy_sessions",
			"Live sessions with other proxies, by the network they run over (tcp, or unix: the same-host socket).",
			[]string{"net"}, labels),
		count: sessions,
	}
	for side, reasons := range refusalReasons {
		for _, r := range reasons {
			if side == "stream" {
				t.streamsRefused.WithLabelValues(r)
			} else {
				t.refused.WithLabelValues(side, r)
			}
		}
	}
	return t
}

// ObserveRefusal counts one refused session or stream; it fits
// channels.Config.OnRefused.
func (t *Transport) ObserveRefusal(r channels.Refusal) {
	switch {
	case r.Stream:
		t.streamsRefused.WithLabelValues(r.Reason).Inc()
	case r.Dialed:
		t.refused.WithLabelValues("dial", r.Reason).Inc()
	default:
		t.refused.WithLabelValues("accept", r.Reason).Inc()
	}
}

// SetInsecure reports whether sessions without TLS are allowed with
// proxies on other hosts.
func (t *Transport) SetInsecure(insecure bool) {
	v := 0.0
	if insecure {
		v = 1
	}
	t.insecure.Set(v)
}

// ObserveHandshake records one handshake; it fits channels.Config.OnHandshake.
func (t *Transport) ObserveHandshake(_ string, dialed bool, d time.Duration, err error) {
	side, result := "accept", "ok"
	if dialed {
		side = "dial"
	}
	if err != nil {
		result = "error"
	}
	t.handshakes.WithLabelValues(side, result).Observe(d.Seconds())
}

// Describe implements prometheus.Collector.
func (t *Transport) Describe(ch chan<- *prometheus.Desc) {
	t.handshakes.Describe(ch)
	t.refused.Describe(ch)
	t.streamsRefused.Describe(ch)
	t.insecure.Describe(ch)
	ch <- t.sessions
}

// Collect implements prometheus.Collector.
func (t *Transport) Collect(ch chan<- prometheus.Metric) {
	t.handshakes.Collect(ch)
	t.refused.Collect(ch)
	t.streamsRefused.Collect(ch)
	t.insecure.Collect(ch)
	live := t.count()
	nets := slices.Clone(sessionNets)
	for n := range live {
		if !slices.Contains(nets, n) {
			nets = append(nets, n)
		}
	}
	slices.Sort(nets)
	for _, n := range nets {
		ch <- prometheus.MustNewConstMetric(t.sessions, prometheus.GaugeValue, float64(live[n]), n)
	}
}
