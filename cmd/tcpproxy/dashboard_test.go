package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const dashboardFile = "../../deploy/grafana/tcpproxy.json"

// dashboardQueries returns every PromQL query in a Grafana dashboard: the
// panels' targets (expr, at any depth, so rows' panels too) and the
// template variables' queries.
func dashboardQueries(t *testing.T, path string) []string {
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var dash map[string]any
	require.NoError(t, json.Unmarshal(data, &dash), "%s is not JSON", path)
	var out []string
	var walk func(v any, key string)
	walk = func(v any, key string) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				walk(x, k)
			}
		case []any:
			for _, x := range v {
				walk(x, key)
			}
		case string:
			if key == "expr" || key == "query" && strings.Contains(v, "(") {
				out = append(out, v)
			}
		}
	}
	walk(dash["panels"], "")
	walk(dash["templating"], "")
	return out
}

var (
	// Our metrics' names all start with these prefixes; anything else in
	// a query is PromQL (functions, keywords) or a label.
	metricRef = regexp.MustCompile(`\b((?:tcpproxy|go|process)_[a-zA-Z0-9_]+)\b(\{[^}]*\})?`)
	matcher   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	grouping  = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	labelVals = regexp.MustCompile(`label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)`)
)

// checkQueries reports what the queries use that exported (metric name →
// its label names) lacks: metrics, label matchers on them, grouping
// labels and label_values labels.
func checkQueries(queries []string, exported map[string]map[string]bool) []string {
	var problems []string
	for _, q := range queries {
		refs := metricRef.FindAllStringSubmatch(q, -1)
		if len(refs) == 0 {
			problems = append(problems, fmt.Sprintf("%q queries no tcpproxy metric", q))
			continue
		}
		labels := map[string]bool{"le": true} // histogram_quantile groups by le
		for _, r := range refs {
			name, sel := r[1], r[2]
			have, ok := exported[name]
			if !ok {
				problems = append(problems, fmt.Sprintf("%q: metric %s is not exported", q, name))
				continue
			}
			for l := range have {
				labels[l] = true
			}
			for _, m := range matcher.FindAllStringSubmatch(sel, -1) {
				if !have[m[1]] {
					problems = append(problems, fmt.Sprintf("%q: %s has no label %s", q, name, m[1]))
				}
			}
		}
		for _, g := range grouping.FindAllStringSubmatch(q, -1) {
			for l := range strings.SplitSeq(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" && !labels[l] {
					problems = append(problems, fmt.Sprintf("%q: no metric in it has the label %s it groups by", q, l))
				}
			}
		}
		for _, lv := range labelVals.FindAllStringSubmatch(q, -1) {
			if have, ok := exported[lv[1]]; ok && !have[lv[2]] {
				problems = append(problems, fmt.Sprintf("%q: %s has no label %s", q, lv[1], lv[2]))
			}
		}
	}
	return problems
}

// scrape returns the metric names (histograms as their _bucket, _count
// and _sum series) and label names that the admin endpoint at addr
// exports, added to into.
func scrape(addr string, into map[string]map[string]bool) error {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return fmt.Errorf("parse /metrics of %s: %w", addr, err)
	}
	add := func(name string, labels ...string) {
		if into[name] == nil {
			into[name] = make(map[string]bool)
		}
		for _, l := range labels {
			into[name][l] = true
		}
	}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, lp.GetName())
			}
			if m.GetHistogram() != nil {
				add(name+"_bucket", append(labels, "le")...)
				add(name+"_count", labels...)
				add(name+"_sum", labels...)
				continue
			}
			add(name, labels...)
		}
	}
	return nil
}

// TestDashboardMetricsExported: every metric the Grafana dashboard queries,
// with the labels it selects and groups by, is exported by a running
// two-instance mesh (mutual TLS, so the certificate metrics are there)
// that carried traffic and failed a dial. Renaming a
// metric or a label breaks this test rather than the dashboard.
func TestDashboardMetricsExported(t *testing.T) {
	queries := dashboardQueries(t, dashboardFile)
	require.Greater(t, len(queries), 10, "queries found in %s", dashboardFile)

	m := startStatusMesh(t)
	m.echo(t, 10_000)
	var problems []string
	var exported map[string]map[string]bool
	// Some series exist only once measured (the RTT after the first
	// keepalive pong); give them the time.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		exported = make(map[string]map[string]bool)
		for _, a := range []string{m.cliAdmin, m.srvAdmin} {
			assert.NoError(c, scrape(a, exported))
		}
		problems = checkQueries(queries, exported)
		assert.Empty(c, problems)
	}, 20*time.Second, 50*time.Millisecond)

	// The dashboard covers what operators ask first.
	all := strings.Join(queries, "\n")
	for _, name := range []string{
		"tcpproxy_sessions", "tcpproxy_peer_sessions", "tcpproxy_peer_rtt_seconds", "tcpproxy_mesh_members",
		"tcpproxy_connections_active", "tcpproxy_connections_failed_total", "tcpproxy_connections_refused_total",
		"tcpproxy_bytes_total", "tcpproxy_handshake_seconds_bucket", "tcpproxy_handshake_seconds_count",
		"tcpproxy_handshake_refused_total", "tcpproxy_stream_refused_total", "tcpproxy_transport_insecure",
		"tcpproxy_certificate_expiry_timestamp_seconds", "tcpproxy_certificate_reloads_total",
	} {
		assert.Contains(t, all, name)
	}
	// Certificate expiry shows as time left, coloured by thresholds.
	assert.Regexp(t, `tcpproxy_certificate_expiry_timestamp_seconds[^\n]*\) - time\(\)`, all)
	m.cli.stop(t)
	m.srv.stop(t)
}

// TestDashboardExpiryThresholds: the certificate expiry panel shows time
// left in seconds, red under 3 days and green beyond 7.
func TestDashboardExpiryThresholds(t *testing.T) {
	data, err := os.ReadFile(dashboardFile)
	require.NoError(t, err)
	var dash struct {
		Panels []struct {
			Title       string
			FieldConfig struct {
				Defaults struct {
					Unit       string
					Thresholds struct {
						Steps []struct {
							Color string
							Value *float64
						}
					}
				}
			}
			Targets []struct{ Expr string }
		}
	}
	require.NoError(t, json.Unmarshal(data, &dash))
	found := false
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 || !strings.Contains(p.Targets[0].Expr, "tcpproxy_certificate_expiry_timestamp_seconds") {
			continue
		}
		found = true
		d := p.FieldConfig.Defaults
		assert.Equal(t, "dtdurations", d.Unit, "panel %q", p.Title)
		steps := d.Thresholds.Steps
		require.Len(t, steps, 3, "panel %q", p.Title)
		assert.Equal(t, "red", steps[0].Color)
		require.NotNil(t, steps[1].Value)
		require.NotNil(t, steps[2].Value)
		assert.Equal(t, 3*86400.0, *steps[1].Value)
		assert.Equal(t, "green", steps[2].Color)
		assert.Equal(t, 7*86400.0, *steps[2].Value)
	}
	assert.True(t, found, "no panel shows the certificate expiry")
}

// TestCheckQueries: the checker catches a renamed metric, a label that
// is not there and a grouping by a missing label.
func TestCheckQueries(t *testing.T) {
	exported := map[string]map[string]bool{
		"tcpproxy_bytes_total":              {"iid": true, "channel": true, "direction": true},
		"tcpproxy_handshake_seconds_bucket": {"iid": true, "side": true, "le": true},
	}
	ok := []string{
		`sum by (channel, direction) (rate(tcpproxy_bytes_total{iid=~"$iid"}[$__rate_interval]))`,
		`histogram_quantile(0.99, sum by (le, side) (rate(tcpproxy_handshake_seconds_bucket[5m])))`,
		`label_values(tcpproxy_bytes_total{iid=~"$iid"}, channel)`,
	}
	assert.Empty(t, checkQueries(ok, exported))
	got := checkQueries([]string{
		`rate(tcpproxy_byte_total[1m])`,
		`tcpproxy_bytes_total{dir="out"}`,
		`sum by (peer) (tcpproxy_bytes_total)`,
		`label_values(tcpproxy_bytes_total, kind)`,
		`up`,
	}, exported)
	want := []string{"metric tcpproxy_byte_total is not exported", "has no label dir", "groups by", "has no label kind", "queries no tcpproxy metric"}
	require.Len(t, got, len(want), "%q", got)
	for i, w := range want {
		assert.Contains(t, got[i], w)
	}
	assert.False(t, slices.Contains(got, ""))
}
