package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/tun"
	"github.com/tcpproxy/tcpproxy/tun/tuntest"
)

// tunNamespace makes a network namespace for the test, with its loopback
// up, and returns what prefixes a command to run it there with `ip`. It
// skips the test without root, /dev/net/tun, ip or the tools named.
func tunNamespace(t *testing.T, tools ...string) (inNS func(args ...string) []string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) for a network namespace and a TUN device")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (.ci/run installs it): %v", tool, err)
		}
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	ns := "tp-tun-" + hex.EncodeToString(rnd[:])
	out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput()
	require.NoError(t, err, "%s", out)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	inNS = func(args ...string) []string { return append([]string{"netns", "exec", ns}, args...) }
	out, err = exec.Command("ip", inNS("ip", "link", "set", "lo", "up")...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return inNS
}

// tunClientConfig is the configuration of a client instance "cli-1" on
// the tun network (device dev), calling the reply channel cache (port
// 16379) of "srv-1" at 127.0.0.1:7002.
func tunClientConfig(dev string) string {
	return `iid: cli-1
role: client
listen: 127.0.0.1:7001
network: tun
tun: {name: ` + dev + `}
members:
  static:
    - {iid: srv-1, role: server, addr: "127.0.0.1:7002", channels: {cache: 16379}}
channels:
  cache: {kind: request, port: 16379}
drainTimeout: 2s
`
}

// TestTUNDeletedDeviceExits: an instance whose TUN device is deleted
// under it (an operator's `ip link del`, a CNI plugin cleaning up) no
// longer reaches its legacy programs; it stops passing for ready and exits
// with an error naming the device, so that its supervisor restarts it.
func TestTUNDeletedDeviceExits(t *testing.T) {
	inNS := tunNamespace(t)
	cfg := filepath.Join(t.TempDir(), "client.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte(tunClientConfig("tptun1")), 0o600))
	client := startProcWith(t, "ip", nil, inNS(tcpproxyBinary(t), "run", "-config", cfg)...)
	require.Eventually(t, func() bool { return strings.Contains(client.out.String(), "proxy ready") }, 30*time.Second, 10*time.Millisecond, "client log:\n%s", client.out)

	out, err := exec.Command("ip", inNS("ip", "link", "del", "tptun1")...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	select {
	case err := <-client.done:
		require.Error(t, err, "tcpproxy exited cleanly with its device gone:\n%s", client.out)
	case <-time.After(30 * time.Second):
		require.FailNow(t, "tcpproxy did not exit with its device gone", client.out.String())
	}
	assert.Contains(t, client.out.String(), "network failed")
	assert.Regexp(t, `device tptun1 (was deleted|went down)`, client.out.String())
}

// TestTUNUnmodifiedRedisCLI: inside a network namespace made for the
// test, a client instance runs on the tun network and an unmodified
// redis-cli reaches a redis-server behind a reply instance through it:
// the kernel routes 127.1.0.1 into the TUN device, the gVisor stack takes
// the connection, and the stream goes to the other proxy.
func TestTUNUnmodifiedRedisCLI(t *testing.T) {
	inNS := tunNamespace(t, "redis-server", "redis-cli")
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		return p
	}
	// The server instance stays on the loopback network, in ranges that
	// are not routed into the TUN device.
	serverCfg := write("server.yaml", `iid: srv-1
role: server
listen: 127.0.0.1:7002
addressing: {instanceRange: 127.20.0.0/16, requestRange: 127.21.0.0/16}
members:
  static:
    - {iid: cli-1, role: client, addr: "127.0.0.1:7001"}
channels:
  cache: {kind: reply, port: 16379}
drainTimeout: 2s
`)
	clientCfg := write("client.yaml", tunClientConfig("tptun0"))
	bin := tcpproxyBinary(t)
	// `ip netns exec` execs tcpproxy, so signals reach it directly.
	server := startProcWith(t, "ip", nil, inNS(bin, "run", "-config", serverCfg, "--", "sh", "-c",
		`exec redis-server --bind "$TCPPROXY_CACHE_IP" --port "$TCPPROXY_CACHE_PORT" --save "" --appendonly no --protected-mode no`)...)
	client := startProcWith(t, "ip", nil, inNS(bin, "run", "-config", clientCfg)...)

	cli := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "ip", inNS(append([]string{"redis-cli", "-h", "127.1.0.1", "-p", "16379"}, args...)...)...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		out, err := cli("PING")
		assert.NoError(c, err)
		assert.Equal(c, "PONG", out)
	}, 30*time.Second, 100*time.Millisecond, "client log:\n%s", client.out)
	out2, err := cli("SET", "k", "through-the-tun")
	require.NoError(t, err)
	require.Equal(t, "OK", out2)
	out2, err = cli("GET", "k")
	require.NoError(t, err)
	require.Equal(t, "through-the-tun", out2)
	// redis-server sees the client instance's IP, in the server's view.
	a := proxy.NewInstanceAllocator(netip.MustParsePrefix("127.20.0.0/16"))
	_, err = a.Add("srv-1")
	require.NoError(t, err)
	cliIP, err := a.Add("cli-1")
	require.NoError(t, err)
	out2, err = cli("CLIENT", "LIST")
	require.NoError(t, err)
	assert.Contains(t, out2, "addr="+cliIP.String()+":")

	log := client.stop(t)
	assert.Contains(t, log, "event close")
	// A clean exit removes the device and its routing.
	out, err := exec.Command("ip", inNS("ip", "link", "show", "tptun0")...).CombinedOutput()
	require.Error(t, err, "device still there after exit: %s", out)
	rules, err := exec.Command("ip", inNS("ip", "rule")...).CombinedOutput()
	require.NoError(t, err)
	assert.Contains(t, string(rules), "0:\tfrom all lookup local", "local rule restored at priority 0")
	server.stop(t)
}

func TestTUNCleanupSaysWhatItDid(t *testing.T) {
	ns := tuntest.New(t)
	var out bytes.Buffer
	var dev *tun.Device
	var err error
	ns.Do(func() { dev, err = tun.Create(tun.Config{Name: "tpclean", Logger: slog.New(slog.DiscardHandler)}) })
	require.NoError(t, err)
	defer dev.Close()

	// This process holds the device, as a running instance does.
	ns.Do(func() { err = cmdTUN([]string{"cleanup", "-name", "tpclean"}, &out, io.Discard) })
	require.ErrorContains(t, err, "a running instance holds TUN device tpclean open")
	assert.Empty(t, out.String())

	ns.Do(func() { err = cmdTUN([]string{"cleanup", "-name", "tpclean", "-force"}, &out, io.Discard) })
	require.NoError(t, err)
	assert.Contains(t, out.String(), "cleaned up TUN device tpclean: deleted the device, removed")

	out.Reset()
	ns.Do(func() { err = cmdTUN([]string{"cleanup", "-name", "tpclean"}, &out, io.Discard) })
	require.NoError(t, err)
	assert.Contains(t, out.String(), "nothing to clean up: no TUN device tpclean")
}
