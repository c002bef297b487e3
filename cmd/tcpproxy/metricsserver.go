package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// The metrics listener (`metrics:` in the configuration) serves
// Prometheus metrics, and nothing else, on an address Prometheus can
// reach, typically the pod's (0.0.0.0:9100). The admin endpoint, with the
// status, the profiles and the readiness, stays on 127.0.0.1. Anyone who
// reaches the address can read the metrics, so it is bounded like any
// exposed server: a few connections and scrapes at once, small headers,
// and timeouts on every phase.
var metricsLimits = struct {
	conns, requests int // open connections; scrapes being answered
	headerBytes     int
	readHeader      time.Duration // request line and headers
	read, write     time.Duration // whole request; whole response
	idle            time.Duration // between keep-alive requests
	gather          time.Duration // collecting the metrics
}{
	conns: 16, requests: 4, headerBytes: 8 << 10,
	readHeader: 5 * time.Second, read: 10 * time.Second, write: 30 * time.Second,
	idle: 2 * time.Minute, gather: 20 * time.Second,
}

// validateMetrics checks the metrics listen address: empty (off) or
// ip:port with a port of its own, not that of the admin endpoint or of the
// transport listener.
func validateMetrics(addr, admin, listen string) error {
	if addr == "" {
		return nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("metrics: %q is not an ip:port address (e.g. 0.0.0.0:9100, or the pod's IP and a port): %w", addr, err)
	}
	if ap.Port() == 0 {
		return fmt.Errorf("metrics: %q has port 0; Prometheus scrapes a fixed port (e.g. 0.0.0.0:9100)", addr)
	}
	for _, other := range []struct{ what, addr string }{{"admin", admin}, {"listen", listen}} {
		if overlaps(ap, other.addr) {
			return fmt.Errorf("metrics: %s takes the port of %s %s; give it a port of its own", addr, other.what, other.addr)
		}
	}
	return nil
}

// overlaps reports whether listening on ap and on other (host:port)
// would clash: the same port, and the same IP or either a wildcard.
func overlaps(ap netip.AddrPort, other string) bool {
	host, port, err := net.SplitHostPort(other)
	if err != nil || port != fmt.Sprint(ap.Port()) {
		return false
	}
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return host == "localhost" && (ap.Addr().IsLoopback() || ap.Addr().IsUnspecified())
	}
	return ip.Unmap() == ap.Addr().Unmap() || ip.IsUnspecified() || ap.Addr().IsUnspecified()
}

// metricsMux serves GET /metrics from the observer's registry; every
// other path is 404.
func metricsMux(o *observer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(o.registry, promhttp.HandlerOpts{
		MaxRequestsInFlight: metricsLimits.requests,
		Timeout:             metricsLimits.gather,
	}))
	return mux
}

// startMetrics serves the metrics listener on addr (validated) until the
// returned stop function is called; it returns the address it listens on.
func startMetrics(addr string, log *slog.Logger, o *observer) (net.Addr, func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           metricsMux(o),
		ReadHeaderTimeout: metricsLimits.readHeader,
		ReadTimeout:       metricsLimits.read,
		WriteTimeout:      metricsLimits.write,
		IdleTimeout:       metricsLimits.idle,
		MaxHeaderBytes:    metricsLimits.headerBytes,
		// What strangers send (bad requests, broken connections) is not
		// worth more than a debug line.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(netutil.LimitListener(ln, metricsLimits.conns)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics listener stopped", "err", err)
		}
	})
	log.Info("metrics listening", "addr", ln.Addr().String(), "metrics", "http://"+ln.Addr().String()+"/metrics")
	return ln.Addr(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
		wg.Wait()
	}, nil
}
