package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/goleak"
)

// TestMain doubles as a legacy program for the end-to-end tests: with
// TCPPROXY_TEST_LEGACY=http the test binary is an HTTP server bound where
// tcpproxy told it to bind, answering with its iid and the caller's address.
func TestMain(m *testing.M) {
	if os.Getenv("TCPPROXY_TEST_LEGACY") == "http" {
		os.Exit(legacyHTTPServer())
	}
	goleak.VerifyTestMain(m)
}

func legacyHTTPServer() int {
	addr := net.JoinHostPort(os.Getenv("TCPPROXY_API_IP"), os.Getenv("TCPPROXY_API_PORT"))
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "legacy http:", err)
		return 1
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s, caller %s, path %s", os.Getenv("TCPPROXY_IID"), r.RemoteAddr, r.URL.Path)
	})}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	_ = srv.Serve(ln)
	return 0
}

func TestDemoRuns(t *testing.T) {
	for _, network := range []string{"loopback", "memory"} {
		t.Run(network, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := realMain([]string{"demo", "-network", network}, &out, &errOut)
			require0(t, code, out.String()+errOut.String())
			for _, want := range []string{"distribution: kv-0=3 kv-1=3 kv-2=3", "peer-b says: hello", "demo finished"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("demo output lacks %q:\n%s", want, out.String())
				}
			}
		})
	}
}

func require0(t *testing.T, code int, output string) {
	t.Helper()
	if code != 0 {
		t.Fatalf("exit status %d:\n%s", code, output)
	}
}
