package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/cmd/tcpproxy/statuspage"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/proxy/metrics"
)

// adminHost is the only address the admin endpoint may bind: it serves
// profiles and internals and has no authentication.
var adminHost = netip.MustParseAddr("127.0.0.1")

// validateAdmin checks the admin listen address: empty (off) or
// 127.0.0.1:port.
func validateAdmin(addr string) error {
	if addr == "" {
		return nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("admin: %q is not an ip:port address (want 127.0.0.1:port): %w", addr, err)
	}
	if ap.Addr() != adminHost {
		return fmt.Errorf("admin: %q must listen on 127.0.0.1 only (it serves profiles without authentication)", addr)
	}
	return nil
}

// adminVars is what /debug/vars reports.
type adminVars struct {
	Goroutines int    `json:"goroutines"`
	HeapAlloc  uint64 `json:"heapAlloc"`
	HeapInuse  uint64 `json:"heapInuse"`
	StackInuse uint64 `json:"stackInuse"`
	Sys        uint64 `json:"sys"`
	NumGC      uint32 `json:"numGC"`
}

// observer is what the admin endpoint reports about the instance: its
// metrics registry, whether it is ready, and its status. It exists before
// the instance does, so that a failing start is visible too.
type observer struct {
	iid       string
	started   time.Time
	registry  *prometheus.Registry
	transport *metrics.Transport
	node      atomic.Pointer[channels.Node]
	instance  atomic.Pointer[instance]
	ready     atomic.Bool
	// history holds the channels' recent counters for the status page;
	// nil until startAdmin starts sampling.
	history *sampler
}

func newObserver(iid string) *observer {
	o := &observer{iid: iid, started: time.Now(), registry: prometheus.NewRegistry()}
	o.transport = metrics.NewTransport(iid, func() map[string]int {
		if n := o.node.Load(); n != nil {
			return n.SessionsByNet()
		}
		return nil
	})
	mesh := metrics.NewMesh(iid, func() (channels.Status, bool) {
		if n := o.node.Load(); n != nil {
			return n.Status(), true
		}
		return channels.Status{}, false
	})
	o.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), o.transport, mesh)
	return o
}

// onHandshake is the node's handshake hook; nil for a nil observer.
func (o *observer) onHandshake() func(string, bool, time.Duration, error) {
	if o == nil {
		return nil
	}
	return o.transport.ObserveHandshake
}

// attach adds a started instance's counters and status.
func (o *observer) attach(in *instance) {
	o.node.Store(in.node)
	o.instance.Store(in)
	o.registry.MustRegister(metrics.NewCollector(in.proxy.IID(), in.proxy))
	if in.creds != nil {
		o.registry.MustRegister(metrics.NewCertificates(in.proxy.IID(), in.creds))
	}
}

// channelStats returns the attached proxy's counters, nil before attach.
func (o *observer) channelStats() []proxy.ChannelStats {
	if in := o.instance.Load(); in != nil {
		return in.proxy.Stats()
	}
	return nil
}

// adminMux serves the status page at /, its data at /api/status,
// Prometheus metrics at /metrics, liveness at /healthz, readiness (the
// proxy sent Ready and is not shutting down) at /readyz, net/http/pprof
// under /debug/pprof/ and a JSON goroutine count and memory summary at
// /debug/vars. It answers only requests addressed to an IP address or
// localhost (see localOnly).
func adminMux(o *observer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /{$}", statuspage.Handler())
	mux.Handle("GET /static/", statuspage.Handler())
	mux.HandleFunc("GET /api/status", o.serveStatus)
	mux.Handle("/metrics", promhttp.HandlerFor(o.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !o.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/debug/vars", func(w http.ResponseWriter, r *http.Request) {
		var ms runtime.MemStats
		if r.URL.Query().Get("memstats") != "0" {
			runtime.ReadMemStats(&ms)
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(adminVars{
			Goroutines: runtime.NumGoroutine(),
			HeapAlloc:  ms.HeapAlloc, HeapInuse: ms.HeapInuse, StackInuse: ms.StackInuse,
			Sys: ms.Sys, NumGC: ms.NumGC,
		})
	})
	return localOnly(mux)
}

// localOnly refuses requests whose Host is a name other than localhost.
// The endpoint listens on 127.0.0.1 only, but a web page in the operator's
// browser could still reach it through a name it controls that resolves to
// 127.0.0.1 (DNS rebinding) and read the status or profiles; such a
// request carries that name as its Host.
func localOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err != nil && host != "localhost" {
			http.Error(w, "admin endpoint: use http://127.0.0.1:PORT/ or http://localhost:PORT/", http.StatusMisdirectedRequest)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// startAdmin serves the admin endpoint on addr (validated) until the
// returned stop function is called.
func startAdmin(addr string, log *slog.Logger, o *observer) (stop func(), err error) {
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: adminMux(o), ReadHeaderTimeout: 5 * time.Second}
	o.history = newSampler(historyEvery)
	var wg sync.WaitGroup
	stopSampling := make(chan struct{})
	wg.Go(func() { o.history.run(o.channelStats, stopSampling) })
	wg.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("admin endpoint stopped", "err", err)
		}
	})
	log.Info("admin endpoint listening", "addr", ln.Addr().String(), "status", "http://"+ln.Addr().String()+"/")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		close(stopSampling)
		wg.Wait()
	}, nil
}
