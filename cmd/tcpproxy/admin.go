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
	"time"
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

// adminMux serves net/http/pprof under /debug/pprof/ and a JSON
// goroutine count and memory summary at /debug/vars.
func adminMux() *http.ServeMux {
	mux := http.NewServeMux()
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
	return mux
}

// startAdmin serves the admin endpoint on addr (validated) until the
// returned stop function is called.
func startAdmin(addr string, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: adminMux(), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("admin endpoint stopped", "err", err)
		}
	}()
	log.Info("admin endpoint listening", "addr", ln.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}, nil
}
