package main

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// The cross-host report: the tables, the targets, the summary.

// crossRows are the measured cross-host paths, in table order.
func (r *results) crossRows() []*path {
	var out []*path
	for _, k := range crossPaths {
		for _, p := range r.paths {
			if p.key == k {
				out = append(out, p)
			}
		}
	}
	return out
}

// cell is "value (× base)" for key's metric, or the value alone when key
// is base or base was not measured.
func (r *results) cell(key, base, metric string) string {
	v := num(r.median(key, metric))
	if key == base || !r.has(base) {
		return v
	}
	return v + " (" + times(r.ratio(key, base, metric)) + ")"
}

// pair is "machine · proxies" for a CPU metric.
func (r *results) pair(key, metric string) string {
	pc := num(r.median(key, metric+"_pcpu"))
	return num(r.median(key, metric+"_mcpu")) + " · " + pc
}

const floorKey = "x-relay2"

// crossTables renders the cross-host section.
func (r *results) crossTables(o options) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	rows := r.crossRows()
	skipRow := func(p *path) bool {
		if p.skip != "" {
			w("| %s | skipped: %s |\n", p.name, p.skip)
			return true
		}
		return false
	}
	// bulkOnly leaves out the floors measured for CPU per byte only.
	bulkOnly := func(p *path) bool { return p.skip == "" && p.tests == "bulk" }
	w("## Cross-host: two hosts, a proxy on each\n\n")
	w("Hosts are network namespaces joined by a veth pair (MTU 1500, the kernel's offloads): host A runs the load generator and the client-side proxy, host B the server-side proxy and the bench's echo and sink servers; ")
	w("every path carries A's connections to B's servers. The floor is two plain Go relays, one per host (io.Copy, which splices): the least a two-proxy design whose proxies talk TCP can spend. ")
	w("The TLS anchors (haproxy, stunnel) use mutual TLS 1.3 with the certificates and the cipher suite of tcpproxy's sessions (%s). ", r.suite)
	w("CPU is given twice, as *machine · proxies*: the machine's non-idle CPU time (all processes and the kernel; the machine is shared, so other load adds to it) and the proxy processes' own (user and system time from /proc/PID/stat, the kernel's work on their sockets included). ")
	w("Ratios in parentheses are against the floor (throughput, connections) or the haproxy pair of the same kind (latency), taken within each repetition. ")
	w("Plaintext sessions between the hosts are configured with `%s`.\n\n", strings.TrimSpace(insecureTransport))
	if c := median(r.cipher); !math.IsNaN(c) {
		w("The cipher itself: sealing and opening 1 GiB with %s in 16 KiB records costs %s CPU-s on one core of this machine (measured between the paths of every repetition).\n\n", r.suite, num(c))
	}

	w("### Bulk throughput (MiB/s, %d MiB per connection)\n\n", o.sizeMiB)
	w("| path | 1 connection | %d connections | CPU s/GiB, 1 conn | CPU s/GiB, %d conns |\n|---|--:|--:|--:|--:|\n", o.parallel, o.parallel)
	for _, p := range rows {
		if skipRow(p) {
			continue
		}
		w("| %s | %s | %s | %s | %s |\n", p.name, r.cell(p.key, floorKey, "bulk1"), r.cell(p.key, floorKey, "bulkN"),
			r.pair(p.key, "bulk1"), r.pair(p.key, "bulkN"))
	}

	w("\n### Request/response latency (µs, %d-byte messages)\n\n", o.msgSize)
	w("1 client: %d requests; %d clients: %d requests each, one outstanding per client. In parentheses: × the haproxy pair (TLS paths: × the haproxy TLS pair).\n\n", o.requests, o.clients, o.requestsPer)
	w("| path | p50, 1 client | p99, 1 client | p50, %d clients | p99, %d clients | CPU µs/request (%d clients) |\n|---|--:|--:|--:|--:|--:|\n", o.clients, o.clients, o.clients)
	for _, p := range rows {
		if bulkOnly(p) || skipRow(p) {
			continue
		}
		base := "x-haproxy"
		if p.key == "x-mtls" || p.key == "x-stunnel" || p.key == "x-haproxy-tls" {
			base = "x-haproxy-tls"
		}
		w("| %s | %s | %s | %s | %s | %s |\n", p.name, r.cell(p.key, base, "lat1_p50"), r.cell(p.key, base, "lat1_p99"),
			r.cell(p.key, base, "latN_p50"), r.cell(p.key, base, "latN_p99"), r.pair(p.key, "latN"))
	}

	w("\n### New connections\n\n")
	w("%d connections, each connect + one %d-byte request + close, from %d concurrent clients.\n\n", o.conns, o.msgSize, o.connWorkers)
	w("| path | connections/s | CPU µs/connection |\n|---|--:|--:|\n")
	for _, p := range rows {
		if bulkOnly(p) || skipRow(p) {
			continue
		}
		w("| %s | %s | %s |\n", p.name, r.cell(p.key, floorKey, "cps"), r.pair(p.key, "cps"))
	}
	b.WriteString(r.crossTargets(o))
	return b.String()
}

// verdict says whether every measured value satisfies ok.
func verdict(ok func(float64) bool, vs ...float64) string {
	n, good := 0, 0
	for _, v := range vs {
		if math.IsNaN(v) {
			continue
		}
		n++
		if ok(v) {
			good++
		}
	}
	switch {
	case n == 0:
		return "—"
	case good == n:
		return "yes"
	case good > 0:
		return "**partly**"
	}
	return "**no**"
}

// addedOverCipher is, per repetition, the CPU per GiB that key adds over
// base (metric, e.g. bulkN_pcpu) divided by the cipher's cost per GiB;
// the median.
func (r *results) addedOverCipher(key, base, metric string) float64 {
	a, b := r.vals[key][metric], r.vals[base][metric]
	if a == nil || b == nil || r.cipher == nil {
		return math.NaN()
	}
	var qs []float64
	for i := range a {
		if c := r.cipher[i]; !math.IsNaN(a[i]) && !math.IsNaN(b[i]) && !math.IsNaN(c) && c > 0 {
			qs = append(qs, (a[i]-b[i])/c)
		}
	}
	return median(qs)
}

func (r *results) crossTargets(o options) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("\n### Targets\n\n| target | measured | met |\n|---|---|---|\n")
	atLeast := func(t float64) func(float64) bool { return func(v float64) bool { return v >= t } }
	atMost := func(t float64) func(float64) bool { return func(v float64) bool { return v <= t } }
	n := o.parallel
	// A nil ok marks rows that state a figure without a target.
	var reported func(float64) bool
	ratioRow := func(label, key, base string, ok func(float64) bool, metrics ...string) {
		floor := strings.HasPrefix(label, "floor:")
		if !r.has(key) || !r.has(base) {
			w("| %s | not measured | — |\n", label)
			return
		}
		var parts []string
		var vs []float64
		for _, m := range metrics {
			v := r.ratio(key, base, m)
			vs = append(vs, v)
			parts = append(parts, joinNonEmpty(metricLabel(m, n, o.clients), cpuLabel(m), times(v)))
		}
		met := "(reported)"
		switch {
		case ok != nil:
			met = verdict(ok, vs...)
		case floor:
			met = "(floor)"
		}
		w("| %s | %s | %s |\n", label, strings.Join(parts, ", "), met)
	}
	cipherRow := func(label, key, base string, ok func(float64) bool) {
		if !r.has(key) || !r.has(base) {
			w("| %s | not measured | — |\n", label)
			return
		}
		var parts []string
		var vs []float64
		for _, m := range []string{"bulk1", "bulkN"} {
			for _, c := range []string{"_pcpu", "_mcpu"} {
				v := r.addedOverCipher(key, base, m+c)
				vs = append(vs, v)
				parts = append(parts, joinNonEmpty(metricLabel(m, n, o.clients), cpuLabel(c), times(v)))
			}
		}
		met := "(floor)"
		if ok != nil {
			met = verdict(ok, vs...)
		}
		w("| %s | %s | %s |\n", label, strings.Join(parts, ", "), met)
	}
	cipherRow(fmt.Sprintf("CPU/GiB mutual TLS adds over plaintext ≤ 1.3× sealing+opening a GiB (%s)", r.suite), "x-mtls", "x-tcpproxy", atMost(1.3))
	cipherRow("floor: what TLS adds to two Go relays (crypto/tls, records batched), × the cipher", "x-relay2-tls", "x-relay2", reported)
	cipherRow("floor: what copying through user space (no cipher) adds to two Go relays, × the cipher", "x-relay2-copy", "x-relay2", reported)
	ratioRow("mutual TLS bulk ≥ 1.4× the haproxy TLS pair", "x-mtls", "x-haproxy-tls", atLeast(1.4), "bulk1", "bulkN")
	ratioRow("mutual TLS bulk ≥ 1.4× the stunnel pair", "x-mtls", "x-stunnel", atLeast(1.4), "bulk1", "bulkN")
	ratioRow("TUN client CPU/GiB ≤ 1.1× the loopback client", "x-tun", "x-tcpproxy", atMost(1.1), "bulk1_mcpu", "bulkN_mcpu", "bulk1_pcpu", "bulkN_pcpu")
	ratioRow("floor: a gVisor relay on a TUN + a Go relay, CPU/GiB against two Go relays", "x-tunrelay", "x-relay2", reported, "bulk1_mcpu", "bulkN_mcpu", "bulk1_pcpu", "bulkN_pcpu")
	ratioRow("TUN on both hosts, CPU/GiB against the loopback client", "x-tun2", "x-tcpproxy", reported, "bulk1_mcpu", "bulkN_mcpu", "bulk1_pcpu", "bulkN_pcpu")
	ratioRow("new connections/s ≥ 1.3× the floor (plaintext)", "x-tcpproxy", floorKey, atLeast(1.3), "cps")
	ratioRow("new connections/s ≥ 1.3× the floor (mutual TLS)", "x-mtls", floorKey, atLeast(1.3), "cps")
	ratioRow("p99 ≤ the haproxy pair's (plaintext)", "x-tcpproxy", "x-haproxy", atMost(1), "lat1_p99", "latN_p99")
	ratioRow("p99 ≤ the haproxy TLS pair's (mutual TLS)", "x-mtls", "x-haproxy-tls", atMost(1), "lat1_p99", "latN_p99")
	ratioRow("plaintext bulk ≥ 1.0× the floor", "x-tcpproxy", floorKey, atLeast(1), "bulk1", "bulkN")
	ratioRow("plaintext bulk ≥ 1.4× the haproxy pair", "x-tcpproxy", "x-haproxy", atLeast(1.4), "bulk1", "bulkN")
	return b.String()
}

// joinNonEmpty joins the non-empty parts with spaces.
func joinNonEmpty(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, " ")
}

// cpuLabel names the CPU clock of a metric (or its suffix), if any.
func cpuLabel(m string) string {
	switch {
	case strings.HasSuffix(m, "_pcpu"):
		return "proxies"
	case strings.HasSuffix(m, "_mcpu"):
		return "machine"
	}
	return ""
}

func metricLabel(m string, parallel, clients int) string {
	switch {
	case strings.HasPrefix(m, "bulk1"):
		return "1 conn"
	case strings.HasPrefix(m, "bulkN"):
		return fmt.Sprintf("%d conns", parallel)
	case strings.HasPrefix(m, "lat1"):
		return "1 client"
	case strings.HasPrefix(m, "latN"):
		return fmt.Sprintf("%d clients", clients)
	}
	return ""
}

// summaryRows are the cross-host rows of the summary and the chart.
var summaryRows = []string{"x-direct", "x-relay2", "x-haproxy", "x-tcpproxy", "x-tun", "x-haproxy-tls", "x-stunnel", "x-mtls"}

// summary is a short cross-host table for the README.
func (r *results) summary(o options) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("Two hosts (network namespaces joined by veth), a proxy on each; `go run ./scripts/bench`, %s, load %s; medians of %d runs. ",
		time.Now().UTC().Format("2006-01-02"), r.loadStart, o.reps)
	w("CPU: the proxies' own per GiB moved (%d connections).\n\n", o.parallel)
	w("| path | MiB/s, 1 / %d conns | CPU s/GiB | p99 µs, %d clients | conns/s |\n|---|--:|--:|--:|--:|\n", o.parallel, o.clients)
	for _, k := range summaryRows {
		p := r.path(k)
		if p == nil || p.skip != "" {
			continue
		}
		w("| %s | %s / %s | %s | %s | %s |\n", shortName(k), num(r.median(k, "bulk1")), num(r.median(k, "bulkN")),
			num(r.median(k, "bulkN_pcpu")), num(r.median(k, "latN_p99")), num(r.median(k, "cps")))
	}
	if c := median(r.cipher); !math.IsNaN(c) {
		w("\nSealing and opening a GiB with %s costs %s CPU-s here. ", r.suite, num(c))
	}
	w("Full tables: [bench/results.md](bench/results.md); chart: [bench/results.svg](bench/results.svg).\n")
	return b.String()
}

func (r *results) path(key string) *path {
	for _, p := range r.paths {
		if p.key == key {
			return p
		}
	}
	return nil
}

// shortName is a path's name in the summary and the chart.
func shortName(key string) string {
	return map[string]string{
		"x-direct": "direct (no proxy)", "x-relay2": "two Go relays (floor)", "x-haproxy": "haproxy pair",
		"x-tcpproxy": "tcpproxy", "x-tun": "tcpproxy, client on TUN", "x-tun2": "tcpproxy, TUN both ends",
		"x-haproxy-tls": "haproxy pair, TLS", "x-stunnel": "stunnel pair", "x-mtls": "tcpproxy, mutual TLS",
		"x-relay2-tls": "two Go relays, TLS (floor)", "x-tunrelay": "gVisor relay on TUN (floor)",
		"x-relay2-copy": "two Go relays, copying (floor)",
	}[key]
}

// tcpproxyKeys are the cross-host paths through tcpproxy.
var tcpproxyKeys = map[string]bool{"x-tcpproxy": true, "x-mtls": true, "x-tun": true, "x-tun2": true}
