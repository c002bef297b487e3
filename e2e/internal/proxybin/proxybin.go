// Package proxybin builds the tcpproxy binary that end-to-end tests run in
// their network namespaces, once per test binary, runs it (Process: start,
// restart, stop, with one log file per proxy), and reads the settings those
// tests share from the environment:
//
//	TCPPROXY_E2E_RACE=0|1   build the proxies with -race (default: as the test binary)
//	TCPPROXY_E2E_LOG=level  the proxies' log level (default info)
package proxybin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

var (
	once    sync.Once
	dir     string
	path    string
	errOnce error
)

// Race says whether the proxies are built with -race: like the test
// binary, unless TCPPROXY_E2E_RACE says otherwise.
func Race() bool {
	switch os.Getenv("TCPPROXY_E2E_RACE") {
	case "0", "false":
		return false
	case "1", "true":
		return true
	}
	return raceEnabled
}

// Path builds cmd/tcpproxy on first use and returns the binary's path.
func Path(t testing.TB) string {
	once.Do(func() {
		if dir, errOnce = os.MkdirTemp("", "tcpproxy-e2e-bin-"); errOnce != nil {
			return
		}
		path = filepath.Join(dir, "tcpproxy")
		args := []string{"build", "-o", path}
		if Race() {
			args = append(args, "-race")
		}
		args = append(args, "github.com/tcpproxy/tcpproxy/cmd/tcpproxy")
		if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
			errOnce = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	require.NoError(t, errOnce)
	return path
}

// Cleanup removes the built binary; call it from TestMain after m.Run.
func Cleanup() {
	if dir != "" {
		_ = os.RemoveAll(dir)
	}
}

// LogLevel is the proxies' log level: TCPPROXY_E2E_LOG, default info.
func LogLevel() string {
	if l := os.Getenv("TCPPROXY_E2E_LOG"); l != "" {
		return l
	}
	return "info"
}
