package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy"
)

// defaultAdmin is where `tcpproxy status` looks for an instance when -admin
// is not given; configure the same with `admin: 127.0.0.1:9090`.
const defaultAdmin = "127.0.0.1:9090"

// statusReport is what /api/status serves and `tcpproxy status` prints:
// the instance, its channels (with their members), the mesh members and
// the live sessions. Durations are in seconds, times in RFC 3339.
type statusReport struct {
	Time     time.Time       `json:"time"`
	Instance instanceReport  `json:"instance"`
	Channels []channelReport `json:"channels"`
	Members  []memberReport  `json:"members"`
	Sessions []sessionReport `json:"sessions"`
	// History is there when asked for (?history=1): the channels'
	// counters sampled over the last minutes.
	History *history `json:"history,omitempty"`
}

type instanceReport struct {
	IID     string `json:"iid"`
	Role    string `json:"role"`
	BindIP  string `json:"bindIP,omitempty"`
	Network string `json:"network"`
	Version string `json:"version"`
	// Listen is the transport address other proxies dial.
	Listen string `json:"listen,omitempty"`
	// Transport is "mtls" (mutual TLS), "plaintext" (sessions without
	// TLS, with proxies in this network namespace only) or "insecure"
	// (without TLS, with proxies anywhere: transport.insecure).
	Transport     string    `json:"transport"`
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptimeSeconds"`
	// Ready says the proxy is up (Ready sent) and not shutting down.
	Ready bool `json:"ready"`
}

type channelReport struct {
	Name   string `json:"name"`
	Kind   string `json:"kind"`
	Mode   string `json:"mode,omitempty"`
	Target string `json:"target,omitempty"`
	// Listen are the addresses where the proxy accepts legacy connections
	// (request address, duplex impostors); Connect is where incoming
	// streams become legacy connections (the server at the bind IP).
	Listen  []string `json:"listen"`
	Connect string   `json:"connect,omitempty"`

	Active      int64 `json:"active"`
	Connections int64 `json:"connections"`
	Failed      int64 `json:"failed"`
	Refused     int64 `json:"refused"`
	Reset       int64 `json:"reset"`
	IdleReset   int64 `json:"idleReset"`
	// BytesOut is from the legacy program into the mesh, BytesIn back.
	BytesOut int64 `json:"bytesOut"`
	BytesIn  int64 `json:"bytesIn"`

	// Members are a duplex channel's members (this instance included) or
	// the reply instances a request channel sends to.
	Members []channelMember `json:"members"`
}

type channelMember struct {
	IID string `json:"iid"`
	// IP is the instance IP the legacy program sees for the member.
	IP   string `json:"ip"`
	Port int    `json:"port,omitempty"`
	// Addr is the member's transport address.
	Addr  string `json:"addr"`
	State string `json:"state"`
}

type memberReport struct {
	IID       string            `json:"iid"`
	Role      string            `json:"role"`
	Addr      string            `json:"addr"`
	IP        string            `json:"ip"`
	Channels  map[string]uint16 `json:"channels"`
	State     string            `json:"state"`
	Sessions  int               `json:"sessions"`
	Failures  int               `json:"failures,omitempty"`
	LastError string            `json:"lastError,omitempty"`
	RetryAt   *time.Time        `json:"retryAt,omitempty"`
}

type sessionReport struct {
	Peer   string `json:"peer"`
	Role   string `json:"role"`
	Net    string `json:"net"`
	Local  string `json:"local"`
	Remote string `json:"remote"`
	Dialed bool   `json:"dialed"`
	// Identity is the peer's TLS identity, or "plaintext, " and how the
	// peer was taken for its member (dialed, address, same-host).
	Identity      string    `json:"identity"`
	Established   time.Time `json:"established"`
	AgeSeconds    float64   `json:"ageSeconds"`
	RTTSeconds    float64   `json:"rttSeconds"`
	BytesSent     uint64    `json:"bytesSent"`
	BytesReceived uint64    `json:"bytesReceived"`
	Streams       int       `json:"streams"`
	// Stalled: a write has waited 2s or more without progress; new
	// streams go elsewhere.
	Stalled bool `json:"stalled,omitempty"`
}

// report assembles the status of the instance the observer watches.
func (o *observer) report(now time.Time) statusReport {
	r := statusReport{Time: now, Instance: instanceReport{
		IID: o.iid, Network: "loopback", Version: buildVersion(), Transport: "plaintext",
		Started: o.started, UptimeSeconds: now.Sub(o.started).Seconds(), Ready: o.ready.Load(),
	}, Channels: []channelReport{}, Members: []memberReport{}, Sessions: []sessionReport{}}
	in := o.instance.Load()
	if in == nil {
		return r
	}
	cfg, st, p := in.cfg, in.node.Status(), in.proxy
	r.Instance.Role, r.Instance.Listen, r.Instance.BindIP = st.Role, st.Addr, p.BindIP().String()
	if cfg.Network != "" {
		r.Instance.Network = cfg.Network
	}
	switch {
	case st.TLS:
		r.Instance.Transport = "mtls"
	case st.Insecure:
		r.Instance.Transport = "insecure"
	}
	ipOf := func(iid string) string {
		if ip, ok := p.LookupInstanceIP(iid); ok {
			return ip.String()
		}
		return ""
	}
	members := make(map[string]channels.MemberStatus, len(st.Members))
	for _, m := range st.Members {
		members[m.IID] = m
		mr := memberReport{IID: m.IID, Role: m.Role, Addr: m.Addr, IP: ipOf(m.IID), Channels: m.Channels,
			State: m.State, Sessions: m.Sessions, Failures: m.Failures, LastError: m.LastError}
		if !m.RetryAt.IsZero() {
			mr.RetryAt = &m.RetryAt
		}
		r.Members = append(r.Members, mr)
	}
	for _, s := range st.Sessions {
		id := s.Identity
		if id == "" {
			// How the plaintext peer was taken for its member.
			id = "plaintext, " + s.Auth
		}
		r.Sessions = append(r.Sessions, sessionReport{
			Peer: s.Peer, Role: s.Role, Net: s.Net, Local: s.LocalAddr, Remote: s.RemoteAddr, Dialed: s.Dialed,
			Identity: id, Established: s.Established, AgeSeconds: now.Sub(s.Established).Seconds(),
			RTTSeconds: s.RTT.Seconds(), BytesSent: s.BytesSent, BytesReceived: s.BytesReceived, Streams: s.Streams,
			Stalled: s.Stalled,
		})
	}
	nodeChans := make(map[string]channels.ChannelStatus, len(st.Channels))
	for _, c := range st.Channels {
		nodeChans[c.Name] = c
	}
	stats := p.Stats()
	for i, ci := range p.Channels() {
		cr := channelReport{Name: ci.Channel, Kind: string(ci.Kind), Mode: string(ci.Mode), Target: ci.Target,
			Listen: []string{}, Members: []channelMember{}}
		for _, a := range ci.Listen {
			cr.Listen = append(cr.Listen, a.String())
		}
		if ci.Connect.IsValid() {
			cr.Connect = ci.Connect.String()
		}
		if i < len(stats) && stats[i].Channel == ci.Channel {
			s := stats[i]
			cr.Active, cr.Connections, cr.Failed, cr.Refused = s.Active, s.Connections, s.Failed, s.Refused
			cr.Reset, cr.IdleReset, cr.BytesOut, cr.BytesIn = s.Reset, s.IdleReset, s.BytesOut, s.BytesIn
		}
		switch ci.Kind {
		case proxy.KindDuplex:
			for _, m := range ci.Members {
				state := members[m.IID].State
				if m.Self {
					state = channels.MemberSelf
				}
				cr.Members = append(cr.Members, channelMember{IID: m.IID, IP: m.IP.String(), Port: int(m.Port),
					Addr: members[m.IID].Addr, State: state})
			}
		case proxy.KindRequest:
			for _, iid := range nodeChans[ci.Channel].Members {
				m := members[iid]
				cr.Members = append(cr.Members, channelMember{IID: iid, IP: ipOf(iid), Port: int(m.Channels[ci.Target]),
					Addr: m.Addr, State: m.State})
			}
		}
		r.Channels = append(r.Channels, cr)
	}
	return r
}

// serveStatus serves the report as JSON; ?history=1 adds the history.
func (o *observer) serveStatus(w http.ResponseWriter, req *http.Request) {
	r := o.report(time.Now())
	if req.URL.Query().Get("history") == "1" {
		r.History = o.history.snapshot()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(r)
}

// cmdStatus asks a running instance's admin endpoint for its status.
func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := fs.String("admin", defaultAdmin, "the instance's admin endpoint (its `admin:` setting)")
	asJSON := fs.Bool("json", false, "print the status as JSON (the admin endpoint's /api/status)")
	check := fs.Bool("check", false, "only check readiness: exit 0 when the instance is ready, 1 otherwise (a Kubernetes exec probe)")
	live := fs.Bool("live", false, "only check liveness: exit 0 when the instance answers (a Kubernetes exec probe)")
	timeout := fs.Duration("timeout", 2*time.Second, "how long to wait for the instance")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tcpproxy status [-admin 127.0.0.1:PORT] [-json | -check | -live]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected arguments %q", fs.Args())}
	}
	if err := validateAdmin(*admin); err != nil || *admin == "" {
		return usageError{fmt.Errorf("-admin: %q is not 127.0.0.1:port", *admin)}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c := adminClient{addr: *admin}
	path := "/api/status"
	switch {
	case *check:
		path = "/readyz"
	case *live:
		path = "/healthz"
	}
	body, err := c.get(ctx, path)
	if err != nil {
		return err
	}
	if *asJSON || *check || *live {
		_, err := io.WriteString(stdout, body)
		return err
	}
	var r statusReport
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		return fmt.Errorf("status from %s: %w", *admin, err)
	}
	return printStatus(stdout, r)
}

// adminClient talks to an admin endpoint.
type adminClient struct{ addr string }

// get returns the body of path, or an error that says what to do when
// nothing answers or the answer is not 200.
func (c adminClient) get(ctx context.Context, path string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.addr+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("no tcpproxy instance answers at %s (%w); is it running, with `admin: %s` in its configuration? (-admin names another address)", c.addr, errors.Unwrap(err), c.addr)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return "", fmt.Errorf("read %s from %s: %w", path, c.addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s at %s: %s: %s", path, c.addr, resp.Status, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}

// printStatus writes r for a terminal of 80 columns: the instance, then
// one line per channel, member and session. Long identities and errors
// are cut at the 80th column; -json has them whole.
func printStatus(w io.Writer, r statusReport) error {
	in := r.Instance
	ready := "ready"
	if !in.Ready {
		ready = "NOT READY"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s (%s) %s, bind %s, %s, %s, up %s\n", in.IID, orDash(in.Role), ready,
		orDash(in.BindIP), in.Network, in.Transport, fmtDuration(in.UptimeSeconds))
	fmt.Fprintf(&b, "listen %s, tcpproxy %s\n\n", orDash(in.Listen), in.Version)

	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHANNEL\tKIND\tADDRESS\tOPEN\tTOTAL\tFAIL\tREFUSED\tOUT\tIN")
	for _, c := range r.Channels {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", c.Name, c.Kind, channelAddr(c),
			c.Active, c.Connections, c.Failed, c.Refused, fmtSize(uint64(c.BytesOut)), fmtSize(uint64(c.BytesIn)))
	}
	if len(r.Channels) == 0 {
		fmt.Fprintln(tw, "(no channels)")
	}
	_ = tw.Flush()

	b.WriteString("\n")
	fmt.Fprintln(tw, "CHANNEL\tMEMBER\tINSTANCE IP\tADDRESS\tSTATE")
	listed := false
	for _, c := range r.Channels {
		for _, m := range c.Members {
			ip := m.IP
			if m.Port != 0 && ip != "" {
				ip = net.JoinHostPort(ip, strconv.Itoa(m.Port))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.Name, m.IID, orDash(ip), orDash(m.Addr), m.State)
			listed = true
		}
	}
	if !listed {
		fmt.Fprintln(tw, "(no members on any channel)")
	}
	_ = tw.Flush()
	for _, m := range r.Members {
		if m.State == channels.MemberBackoff && m.LastError != "" {
			dials := "dials"
			if m.Failures == 1 {
				dials = "dial"
			}
			fmt.Fprintf(&b, "  %s: %d failed %s, the last:\n", m.IID, m.Failures, dials)
			for _, l := range wrap(m.LastError, 74, 4) {
				fmt.Fprintf(&b, "    %s\n", l)
			}
		}
	}

	b.WriteString("\n")
	fmt.Fprintln(tw, "PEER\tNET\tAGE\tRTT\tSENT\tRECEIVED\tSTREAMS\tIDENTITY")
	for _, s := range r.Sessions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", s.Peer, s.Net, fmtDuration(s.AgeSeconds),
			fmtRTT(s.RTTSeconds), fmtSize(s.BytesSent), fmtSize(s.BytesReceived), s.Streams, shortIdentity(s.Identity))
	}
	if len(r.Sessions) == 0 {
		fmt.Fprintln(tw, "(no sessions)")
	}
	_ = tw.Flush()
	for line := range strings.Lines(b.String()) {
		if _, err := fmt.Fprintln(w, clip(strings.TrimSuffix(line, "\n"), 80)); err != nil {
			return err
		}
	}
	return nil
}

// channelAddr is where the legacy side meets the channel: the request
// listener, the legacy server that streams go to (→), or, for a
// connect-only duplex channel, how many impostors listen (one per member,
// at its instance IP).
func channelAddr(c channelReport) string {
	switch {
	case c.Connect != "":
		return "→" + c.Connect
	case c.Kind == "request" && len(c.Listen) == 1:
		return c.Listen[0]
	case len(c.Listen) > 0:
		return fmt.Sprintf("%d impostors", len(c.Listen))
	}
	return "-"
}

// shortIdentity drops the scheme of tcpproxy's own instance URIs, which
// would not fit in 80 columns with the rest of a session's line:
// instance/web-1?role=web. Other identities (SPIFFE IDs) stay whole.
func shortIdentity(id string) string {
	return strings.TrimPrefix(id, "tcpproxy://")
}

// wrap breaks s into lines of at most width runes at spaces, at most max
// lines (the last one cut).
func wrap(s string, width, max int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(s) {
		switch {
		case line == "":
			line = word
		case utf8.RuneCountInString(line)+1+utf8.RuneCountInString(word) <= width:
			line += " " + word
		default:
			lines = append(lines, line)
			line = word
		}
	}
	if line != "" {
		lines = append(lines, line)
	}
	if len(lines) > max {
		lines = append(lines[:max-1], clip(strings.Join(lines[max-1:], " "), width))
	}
	for i, l := range lines {
		lines[i] = clip(l, width)
	}
	return lines
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// clip shortens s to at most n runes, marking the cut.
func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

func fmtDuration(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
}

func fmtRTT(sec float64) string {
	if sec == 0 {
		return "-"
	}
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < time.Millisecond:
		return d.Round(time.Microsecond).String()
	case d < time.Second:
		return d.Round(10 * time.Microsecond).String()
	}
	return d.Round(time.Millisecond).String()
}

// fmtSize writes n bytes in four or five characters: 512B, 1.5K, 879K,
// 12M (binary units).
func fmtSize(n uint64) string {
	const units = "BKMGTPE"
	v, i := float64(n), 0
	for v >= 1000 && i < len(units)-1 {
		v /= 1024
		i++
	}
	switch {
	case i == 0:
		return fmt.Sprintf("%dB", n)
	case v < 10:
		return fmt.Sprintf("%.1f%c", v, units[i])
	}
	return fmt.Sprintf("%.0f%c", v, units[i])
}
