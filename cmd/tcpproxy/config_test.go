package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const goodConfig = `
iid: web-1
role: web
listen: 127.0.0.1:7000
members:
  static:
    - {iid: api-1, role: api, addr: "127.0.0.1:7001", channels: {api: 8080}}
channels:
  api: {kind: request, port: 8080}
  peers: {kind: duplex, port: 2380, mode: both}
legacy: {onChange: SIGHUP, stopTimeout: 2s}
transport: {keepAlive: 5s, dialTimeout: 1s, handshakeTimeout: 2s, sessions: 2, maxHandshakes: 100, maxHandshakesPerIP: 10, maxStreamWindow: 64MiB, maxSessionBuffered: 1073741824}
log: {format: json, level: debug}
drainTimeout: 3s
`

func TestParseConfig(t *testing.T) {
	cfg, err := parseConfig([]byte(goodConfig))
	require.NoError(t, err)
	assert.Equal(t, "web-1", cfg.IID)
	assert.Equal(t, 8080, cfg.Channels["api"].Port)
	assert.Len(t, cfg.Members.Static, 1)
	assert.Equal(t, 100, cfg.Transport.MaxHandshakes)
	assert.Equal(t, 10, cfg.Transport.MaxHandshakesPerIP)
	assert.Equal(t, byteSize(64<<20), cfg.Transport.MaxStreamWindow)
	assert.Equal(t, byteSize(1<<30), cfg.Transport.MaxSessionBuffered)
}

// noSuchCongestion is the error for a congestion control algorithm that
// does not exist: on Linux the kernel has no such thing, elsewhere none
// can be chosen.
var noSuchCongestion = map[bool]string{
	true:  `transport.congestionControl: congestion control "no-such-algorithm" is not available on this host`,
	false: `transport.congestionControl: choosing the congestion control algorithm is supported on Linux only`,
}[runtime.GOOS == "linux"]

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown field", "iid: a\nrole: r\nlisten: x:1\nchanels: {}\n", "chanels (line 4): unknown field; expected one of addressing, admin,"},
		{"unknown nested field", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  cache: {kind: reply, prot: 1}\n", "channels.cache.prot (line 5): unknown field; expected one of balancer, idleTimeout, kind,"},
		{"unknown field in a list", "iid: a\nrole: r\nlisten: x:1\nmembers:\n  static:\n    - {iid: b, adr: x}\n", "members.static[0].adr (line 6): unknown field"},
		{"empty file", "", "the file is empty or holds only comments"},
		{"comments only", "# iid: a\n\n# role: r\n", "the file is empty or holds only comments"},
		{"a list", "- iid: a\n", "the configuration must be a mapping of fields"},
		{"duplicate channel", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: request, port: 1}\n  db: {kind: reply, port: 2}\n", `mapping key "db" already defined`},
		{"bad port", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: request, port: 99999}\n", "channels.db: port 99999 out of range"},
		{"port not a number", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: request, port: http}\n", `channels.db.port (line 5): "http" is not a whole number`},
		{"port too large for a member", "iid: a\nrole: r\nlisten: x:1\nmembers:\n  static:\n    - {iid: b, channels: {db: 70000}}\n", `members.static[0].channels.db (line 6): "70000" is not a whole number from 0 to 65535`},
		{"mode on reply", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: reply, port: 1, mode: bind}\n", `channels.db: mode "bind" is only for duplex`},
		{"unknown kind", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: replay, port: 1}\n", `channels.db: unknown kind "replay" (want request, reply or duplex)`},
		{"bad channel name", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  \"d b\": {kind: reply, port: 1}\n", "channels.d b: "},
		{"network", "iid: a\nrole: r\nlisten: x:1\nnetwork: ethernet\nchannels:\n  db: {kind: reply, port: 1}\n", `network: unknown "ethernet"`},
		{"no listen", "iid: a\nrole: r\nchannels:\n  db: {kind: reply, port: 1}\n", "listen: missing"},
		{"no iid", "role: r\nlisten: x:1\nchannels:\n  db: {kind: reply, port: 1}\n", "iid is empty"},
		{"no channels", "iid: a\nrole: r\nlisten: x:1\n", "channels: none configured"},
		{"half tls", "iid: a\nrole: r\nlisten: x:1\ntls: {cert: a.pem}\nchannels:\n  db: {kind: reply, port: 1}\n", "cert, key and ca are all needed"},
		{"bad duration", "iid: a\nrole: r\nlisten: x:1\ndrainTimeout: soon\nchannels:\n  db: {kind: reply, port: 1}\n", `drainTimeout (line 4): "soon" is not a duration such as 500ms`},
		{"duration without unit in a channel", "iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: request, port: 1, idleTimeout: 600}\n", `channels.db.idleTimeout (line 5): "600" is not a duration such as 500ms, 5s or 1m`},
		{"negative duration", "iid: a\nrole: r\nlisten: x:1\ntransport: {keepAlive: -1s}\nchannels:\n  db: {kind: reply, port: 1}\n", `transport.keepAlive (line 4): "-1s" is not a duration of zero or more`},
		{"bad range", "iid: a\nrole: r\nlisten: x:1\naddressing: {instanceRange: 10.0.0.0/16}\nchannels:\n  db: {kind: reply, port: 1}\n", "not an IPv4 prefix inside 127.0.0.0/8"},
		{"bad signal", "iid: a\nrole: r\nlisten: x:1\nlegacy: {onChange: SIGFOO}\nchannels:\n  db: {kind: reply, port: 1}\n", `"SIGFOO" is not ignore, restart or a signal`},
		{"both members", "iid: a\nrole: r\nlisten: x:1\nmembers: {file: m.yaml, static: [{iid: b}]}\nchannels:\n  db: {kind: reply, port: 1}\n", "give one of file, static, etcd or dns"},
		{"sessions", "iid: a\nrole: r\nlisten: x:1\ntransport: {sessions: 17}\nchannels:\n  db: {kind: reply, port: 1}\n", "transport.sessions: 17 is outside 1..16"},
		{"sameHost", "iid: a\nrole: r\nlisten: x:1\ntransport: {sameHost: pipe}\nchannels:\n  db: {kind: reply, port: 1}\n", `transport.sameHost: "pipe" is not unix or tcp`},
		{"maxHandshakesPerIP", "iid: a\nrole: r\nlisten: x:1\ntransport: {maxHandshakesPerIP: -1}\nchannels:\n  db: {kind: reply, port: 1}\n", "transport.maxHandshakesPerIP: -1 is negative"},
		{"not yaml", "{{{", "did not find expected"},
		{"size not a size", "iid: a\nrole: r\nlisten: x:1\ntransport: {maxStreamWindow: large}\nchannels:\n  db: {kind: reply, port: 1}\n", `transport.maxStreamWindow (line 4): "large" is not a size such as 16MiB, 512KiB or 1048576 (bytes)`},
		{"congestion control not there", "iid: a\nrole: r\nlisten: x:1\ntransport: {congestionControl: no-such-algorithm}\nchannels:\n  db: {kind: reply, port: 1}\n", noSuchCongestion},
		{"window too small", "iid: a\nrole: r\nlisten: x:1\ntransport: {maxStreamWindow: 64KiB}\nchannels:\n  db: {kind: reply, port: 1}\n", "transport.maxStreamWindow: 64 KiB is outside 256KiB..4GiB"},
		{"window too large", "iid: a\nrole: r\nlisten: x:1\ntransport: {maxStreamWindow: 8GiB}\nchannels:\n  db: {kind: reply, port: 1}\n", "transport.maxStreamWindow: 8.0 GiB is outside 256KiB..4GiB"},
		{"session budget too small", "iid: a\nrole: r\nlisten: x:1\ntransport: {maxSessionBuffered: 1000}\nchannels:\n  db: {kind: reply, port: 1}\n", "transport.maxSessionBuffered: 1000 B is below 1MiB"},
		{"static member without a port", "iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: b, role: r, addr: 127.0.0.1}\nchannels:\n  db: {kind: reply, port: 1}\n", `members.static[0]: member "b": addr "127.0.0.1" is not host:port`},
		{"static member with a bad port", "iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: b, role: r, addr: \"127.0.0.1:99999\"}\nchannels:\n  db: {kind: reply, port: 1}\n", `members.static[0]: member "b": addr "127.0.0.1:99999": port must be 1-65535`},
		{"static member with a space", "iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: x y, role: r, addr: \"127.0.0.1:2\"}\nchannels:\n  db: {kind: reply, port: 1}\n", `members.static[0]: iid "x y" contains a space`},
		{"static member with an empty channel", "iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: b, role: r, channels: {\"\": 1}}\nchannels:\n  db: {kind: reply, port: 1}\n", `members.static[0]: member "b": empty channel name`},
		{"static member twice", "iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: b, role: r, addr: \"127.0.0.1:2\"}\n    - {iid: b, role: r, addr: \"127.0.0.1:3\"}\nchannels:\n  db: {kind: reply, port: 1}\n", `members.static[1]: iid "b" is listed twice (first as members.static[0])`},
		{"list for a mapping", "iid: a\nrole: r\nlisten: x:1\nchannels: [db]\n", "line 4: a list is not a mapping of names to values"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tc.yaml))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestEnvName(t *testing.T) {
	assert.Equal(t, "TCPPROXY_MY_DB_1", envName("my-db.1"))
}

// FuzzParseConfig: any input gives a config or an error, never a panic,
// and an accepted config always passes validation again.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte("iid: a\nrole: r\nlisten: x:1\nchannels:\n  db: {kind: request, port: 1}\n"))
	f.Add([]byte("iid: a\nrole: r\nlisten: x:1\nnetwork: tun\ntun: {name: t0, mtu: 9000}\nchannels:\n  p: {kind: duplex, port: 2, mode: connect}\n"))
	f.Add([]byte("members: {etcd: {endpoints: [http://127.0.0.1:2379]}}\n"))
	f.Add([]byte("iid: a\nrole: r\nlisten: x:1\ntls: {cert: c, key: k, ca: a, spiffe: {trustDomain: example.org, idTemplate: \"/ns/{role}/sa/{iid}\"}}\nchannels:\n  db: {kind: reply, port: 1}\n"))
	f.Add([]byte("channels: {a: {kind: request, port: 65536}}"))
	f.Add([]byte("{{{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig(data)
		if err != nil {
			require.Nil(t, cfg)
			return
		}
		require.NoError(t, cfg.validate())
	})
}

func TestExpandEnv(t *testing.T) {
	t.Setenv("TP_TEST_POD", "web-7")
	out, err := expandEnv([]byte("iid: ${TP_TEST_POD}\nrole: $notexpanded\n"))
	require.NoError(t, err)
	assert.Equal(t, "iid: web-7\nrole: $notexpanded\n", string(out))
	_, err = expandEnv([]byte("iid: ${TP_TEST_UNSET_1}${TP_TEST_UNSET_2}"))
	require.ErrorContains(t, err, "environment variables not set: TP_TEST_UNSET_1, TP_TEST_UNSET_2")
}

// TestPlaintextAcrossHostsRefused: a configuration whose sessions would
// run in plaintext on addresses other hosts reach is refused, with both
// ways out; loopback-only configurations and explicit choices are not.
func TestPlaintextAcrossHostsRefused(t *testing.T) {
	const chans = "channels:\n  db: {kind: reply, port: 1}\n"
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"listen on every interface", "listen: 0.0.0.0:7000\n", "(listen 0.0.0.0:7000)"},
		{"listen on a host address", "listen: 10.0.0.1:7000\n", "(listen 10.0.0.1:7000)"},
		{"listen without host", "listen: :7000\n", "(listen :7000)"},
		{"advertise", "listen: 127.0.0.1:7000\nadvertise: 10.0.0.1:7000\n", "(advertise 10.0.0.1:7000)"},
		{"host name", "listen: proxy.example:7000\n", "(listen proxy.example:7000)"},
		{"static member", "listen: 127.0.0.1:7000\nmembers: {static: [{iid: b, role: r, addr: \"10.0.0.2:7000\"}]}\n", "(member b at 10.0.0.2:7000)"},
		{"insecure with tls", "listen: 127.0.0.1:7000\ntransport: {insecure: true}\ntls: {cert: c, key: k, ca: a}\n", "transport.insecure: sessions run over tls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte("iid: a\nrole: r\n" + tc.yaml + chans))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			if !strings.Contains(tc.name, "tls") {
				assert.Contains(t, err.Error(), "Configure tls")
				assert.Contains(t, err.Error(), "tcpproxy certs")
				assert.Contains(t, err.Error(), "transport.insecure: true")
			}
		})
	}
	for _, ok := range []string{
		"listen: 127.0.0.1:7000\nmembers: {static: [{iid: b, role: r, addr: \"127.0.0.2:7000\"}, {iid: a, role: r, addr: \"10.0.0.1:7000\"}]}\n",
		"listen: localhost:7000\n",
		"listen: \"[::1]:7000\"\n",
		"listen: 0.0.0.0:7000\ntransport: {insecure: true}\n",
		"listen: 0.0.0.0:7000\ntls: {cert: c, key: k, ca: a}\n",
	} {
		_, err := parseConfig([]byte("iid: a\nrole: r\n" + ok + chans))
		assert.NoError(t, err, ok)
	}
}

// TestRunRefusesPlaintextMembersFile: `run` refuses a members file with
// members on other hosts when sessions would be plaintext.
func TestRunRefusesPlaintextMembersFile(t *testing.T) {
	dir := t.TempDir()
	members := filepath.Join(dir, "members.yaml")
	require.NoError(t, os.WriteFile(members, []byte("members:\n  - {iid: b, role: r, addr: \"10.0.0.2:7000\"}\n"), 0o600))
	cfg := filepath.Join(dir, "a.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf("iid: a\nrole: r\nlisten: 127.0.0.1:0\nmembers: {file: %s}\nchannels:\n  db: {kind: reply, port: 1}\n", members)), 0o600))
	var out, errOut bytes.Buffer
	code := realMain([]string{"run", "-config", cfg}, &out, &errOut)
	require.Equal(t, 1, code, errOut.String())
	assert.Contains(t, errOut.String(), "(member b at 10.0.0.2:7000)")
	assert.Contains(t, errOut.String(), "tcpproxy certs")
	assert.Contains(t, errOut.String(), "transport.insecure: true")
}

// A static member may have no address: one this proxy never dials, such
// as a client embedded in another program that does not listen, listed so
// that its sessions are accepted.
func TestStaticMemberNeverDialed(t *testing.T) {
	cfg, err := parseConfig([]byte("iid: a\nrole: r\nlisten: 127.0.0.1:1\nmembers:\n  static:\n    - {iid: embedded-client, role: c}\nchannels:\n  db: {kind: reply, port: 1}\n"))
	require.NoError(t, err)
	assert.Empty(t, cfg.Members.Static[0].Addr)
}
