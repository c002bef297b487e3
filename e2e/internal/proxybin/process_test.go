package proxybin

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestProcess(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip(err)
	}
	log := filepath.Join(t.TempDir(), "p.log")
	p := NewProcess("p", log)
	require.False(t, p.Exited())
	require.False(t, p.Running())
	require.True(t, p.Stop(time.Second), "not started")

	// Exits by itself after logging the pattern.
	require.NoError(t, p.Start(exec.Command("sh", "-c", "echo up; echo oops >&2; sleep 0.5; exit 3")))
	require.True(t, p.WaitLog("up", 10*time.Second))
	require.True(t, p.Wait(10*time.Second))
	require.True(t, p.Exited())
	require.Error(t, p.Err())

	// Ignores SIGTERM: Stop kills it after the grace period. WaitLog
	// wants a pattern once per start: "up" twice now, "oops" is there once.
	require.NoError(t, p.Start(exec.Command("sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.05; done")))
	require.True(t, p.WaitLog("up", 10*time.Second))
	require.False(t, p.WaitLog("oops", 100*time.Millisecond))
	require.True(t, p.Running())
	require.False(t, p.Stop(200*time.Millisecond))
	require.True(t, p.Exited())

	// Stops on SIGTERM.
	require.NoError(t, p.Start(exec.Command("sh", "-c", "echo up; exec sleep 60")))
	require.True(t, p.WaitLog("up", 10*time.Second))
	require.True(t, p.Stop(10*time.Second))
	require.False(t, p.WaitLog("never", time.Second), "exited: returns at once")

	got := string(p.ReadLog())
	for i, want := range []string{"=== e2e: start 1 of p at ", "up\n", "oops\n", "=== e2e: start 2 of p at ", "up\n", "=== e2e: start 3 of p at ", "up\n"} {
		j := strings.Index(got, want)
		require.GreaterOrEqual(t, j, 0, "%d: %q not in\n%s", i, want, got)
		got = got[j+len(want):]
	}
	require.Equal(t, "up\n", string(p.Tail(1)))
	require.Equal(t, "b\nc", string(Tail([]byte("a\nb\nc"), 1)))
}
