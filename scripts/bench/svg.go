package main

import (
	"fmt"
	"math"
	"strings"
	"text/template"
	"time"
)

// The cross-host chart: for each path, throughput with 1 and N
// connections, and CPU per GiB (machine and proxies) with N; the anchors
// (grey) beside tcpproxy's paths (blue). Hand-written SVG, no scripts, no
// external assets.

const (
	svgLabelW = 200 // path names
	svgPanelW = 330 // each panel's bar area
	svgGap    = 50  // between the panels
	svgRowH   = 34
	svgTop    = 74
	svgBottom = 46
)

type svgBar struct {
	X, Y, W, H float64
	Fill       string
	Label      string
	LX         float64
}

type svgRow struct {
	Name  string
	Y     float64 // baseline of the name
	Bars  []svgBar
	Shade bool
}

type svgTick struct {
	X     float64
	Label string
}

type svgChart struct {
	W, H                 float64
	Title, Sub           string
	Rows                 []svgRow
	P1X, P2X, PanelW, BY float64 // panel origins, width, bottom of the rows
	Ticks1, Ticks2       []svgTick
	Head1, Head2         string
	Legend1, Legend2     [2]string
}

var svgTemplate = template.Must(template.New("svg").Parse(`<svg xmlns="http://www.w3.org/2000/svg" width="{{.W}}" height="{{.H}}" viewBox="0 0 {{.W}} {{.H}}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<title>{{.Title | html}}</title>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="12" y="22" font-size="15" font-weight="bold">{{.Title | html}}</text>
<text x="12" y="40" fill="#555555">{{.Sub | html}}</text>
<text x="{{.P1X}}" y="62" font-weight="bold">{{.Head1}}</text>
<text x="{{.P2X}}" y="62" font-weight="bold">{{.Head2}}</text>
{{- range .Rows}}
{{- if .Shade}}
<rect x="0" y="{{.Y}}" width="100%" height="34" fill="#f4f6f8" transform="translate(0,-21)"/>
{{- end}}
<text x="12" y="{{.Y}}">{{.Name | html}}</text>
{{- range .Bars}}
<rect x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}" fill="{{.Fill}}"/>
<text x="{{.LX}}" y="{{.Y}}" dy="{{.H}}" dx="0" font-size="10" fill="#333333" transform="translate(0,-1)">{{.Label}}</text>
{{- end}}
{{- end}}
{{- range .Ticks1}}
<line x1="{{.X}}" y1="{{$.BY}}" x2="{{.X}}" y2="{{$.BY}}" stroke="#999999"/>
<text x="{{.X}}" y="{{$.BY}}" dy="14" text-anchor="middle" font-size="10" fill="#555555">{{.Label}}</text>
{{- end}}
{{- range .Ticks2}}
<text x="{{.X}}" y="{{$.BY}}" dy="14" text-anchor="middle" font-size="10" fill="#555555">{{.Label}}</text>
{{- end}}
<line x1="{{.P1X}}" y1="{{$.BY}}" x2="{{.P1X}}" y2="66" stroke="#999999"/>
<line x1="{{.P2X}}" y1="{{$.BY}}" x2="{{.P2X}}" y2="66" stroke="#999999"/>
<rect x="{{.P1X}}" y="{{.BY}}" width="10" height="10" fill="#9aa5b1" transform="translate(0,22)"/>
<text x="{{.P1X}}" y="{{.BY}}" dx="14" dy="31">{{index .Legend1 0}}</text>
<rect x="{{.P1X}}" y="{{.BY}}" width="10" height="10" fill="#52606d" transform="translate(150,22)"/>
<text x="{{.P1X}}" y="{{.BY}}" dx="164" dy="31">{{index .Legend1 1}}</text>
<rect x="{{.P2X}}" y="{{.BY}}" width="10" height="10" fill="#9aa5b1" transform="translate(0,22)"/>
<text x="{{.P2X}}" y="{{.BY}}" dx="14" dy="31">{{index .Legend2 0}}</text>
<rect x="{{.P2X}}" y="{{.BY}}" width="10" height="10" fill="#52606d" transform="translate(150,22)"/>
<text x="{{.P2X}}" y="{{.BY}}" dx="164" dy="31">{{index .Legend2 1}}</text>
</svg>
`))

// niceMax rounds v up to 1, 2 or 5 times a power of ten.
func niceMax(v float64) float64 {
	if v <= 0 || math.IsNaN(v) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func ticks(x0, w, max float64) []svgTick {
	var out []svgTick
	for i := 0; i <= 4; i++ {
		v := max * float64(i) / 4
		out = append(out, svgTick{X: x0 + w*float64(i)/4, Label: num(v)})
	}
	return out
}

// svg renders the chart of the cross-host paths.
func (r *results) svg(o options) string {
	var rows []*path
	for _, p := range r.crossRows() {
		if p.skip == "" {
			rows = append(rows, p)
		}
	}
	var maxT, maxC float64
	for _, p := range rows {
		for _, m := range []string{"bulk1", "bulkN"} {
			if v := r.median(p.key, m); !math.IsNaN(v) {
				maxT = math.Max(maxT, v)
			}
		}
		for _, m := range []string{"bulkN_mcpu", "bulkN_pcpu"} {
			if v := r.median(p.key, m); !math.IsNaN(v) {
				maxC = math.Max(maxC, v)
			}
		}
	}
	maxT, maxC = niceMax(maxT), niceMax(maxC)
	c := svgChart{
		Title:   "tcpproxy across two hosts: throughput and CPU per GiB",
		Sub:     fmt.Sprintf("go run ./scripts/bench, %s, load %s; medians of %d runs; grey: without tcpproxy", time.Now().UTC().Format("2006-01-02"), r.loadStart, o.reps),
		P1X:     svgLabelW,
		P2X:     svgLabelW + svgPanelW + svgGap,
		PanelW:  svgPanelW,
		Head1:   "Throughput, MiB/s (higher is better)",
		Head2:   fmt.Sprintf("CPU s per GiB, %d connections (lower is better)", o.parallel),
		Legend1: [2]string{"1 connection (light)", fmt.Sprintf("%d connections (dark)", o.parallel)},
		Legend2: [2]string{"machine (light)", "proxies (dark)"},
	}
	c.W = c.P2X + svgPanelW + 60
	for i, p := range rows {
		y := float64(svgTop + i*svgRowH)
		row := svgRow{Name: shortName(p.key), Y: y + 16, Shade: i%2 == 1}
		tcp := tcpproxyKeys[p.key]
		light, dark := "#9aa5b1", "#52606d"
		if tcp {
			light, dark = "#7cb3f0", "#1f6fc5"
		}
		bar := func(x0, max float64, metric string, j int, fill string) {
			v := r.median(p.key, metric)
			if math.IsNaN(v) {
				return
			}
			wd := svgPanelW * v / max
			row.Bars = append(row.Bars, svgBar{X: x0, Y: y + 3 + float64(j)*13, W: math.Round(wd*10) / 10, H: 12, Fill: fill,
				Label: num(v), LX: x0 + wd + 4})
		}
		bar(c.P1X, maxT, "bulk1", 0, light)
		bar(c.P1X, maxT, "bulkN", 1, dark)
		bar(c.P2X, maxC, "bulkN_mcpu", 0, light)
		bar(c.P2X, maxC, "bulkN_pcpu", 1, dark)
		rows := &c.Rows
		*rows = append(*rows, row)
	}
	c.BY = float64(svgTop + len(rows)*svgRowH + 4)
	c.H = c.BY + svgBottom
	c.Ticks1 = ticks(c.P1X, svgPanelW, maxT)
	c.Ticks2 = ticks(c.P2X, svgPanelW, maxC)
	var b strings.Builder
	if err := svgTemplate.Execute(&b, c); err != nil {
		return fmt.Sprintf("<!-- chart failed: %v -->\n", err)
	}
	return b.String()
}
