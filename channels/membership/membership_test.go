package membership_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const sample = `# two members
members:
  - iid: a-1
    role: frontend
    addr: 127.0.0.1:7001
    channels: {peers: 2380}
  - iid: b-1
    addr: "[::1]:7002"
    channels:
      db: 5432
      peers: 2380
`

func TestParse(t *testing.T) {
	got, err := membership.Parse([]byte(sample))
	require.NoError(t, err)
	assert.Equal(t, []channels.Member{
		{IID: "a-1", Role: "frontend", Addr: "127.0.0.1:7001", Channels: map[string]uint16{"peers": 2380}},
		{IID: "b-1", Addr: "[::1]:7002", Channels: map[string]uint16{"db": 5432, "peers": 2380}},
	}, got)

	for _, empty := range []string{"", "# nothing\n", "members:\n", "members: []\n", "~\n"} {
		got, err := membership.Parse([]byte(empty))
		require.NoError(t, err, "%q", empty)
		assert.Empty(t, got)
	}
	got, err = membership.Parse([]byte("members:\n  - iid: x\n    addr: h:1\n"))
	require.NoError(t, err)
	assert.Equal(t, map[string]uint16{}, got[0].Channels, "no channels is an empty map")
}

func TestParseErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		in   string
		want string
	}{
		"duplicate iid": {"members:\n  - iid: a\n    addr: h:1\n  - iid: a\n    addr: h:2\n",
			`line 4: duplicate iid "a" (first at line 2)`},
		"missing addr":  {"members:\n  - iid: a\n    role: r\n", `line 2: member "a": missing addr`},
		"missing iid":   {"members:\n  - addr: h:1\n", "line 2: member: missing iid"},
		"port 0":        {"members:\n  - iid: a\n    addr: h:1\n    channels: {peers: 0}\n", `line 4: channel "peers": port "0" must be 1-65535`},
		"port too big":  {"members:\n  - iid: a\n    addr: h:1\n    channels:\n      db: 70000\n", `line 5: channel "db": port "70000" must be 1-65535`},
		"addr port 0":   {"members:\n  - iid: a\n    addr: h:0\n", `member "a": addr "h:0": port must be 1-65535`},
		"addr no port":  {"members:\n  - iid: a\n    addr: host\n", `addr "host" is not host:port`},
		"unknown field": {"members:\n  - iid: a\n    adr: h:1\n", `line 3: unknown field "adr"`},
		"top level":     {"member:\n  - iid: a\n", `line 1: unknown field "member" (want members)`},
		"not a list":    {"members: {a: 1}\n", "line 1: members must be a list"},
		"not a mapping": {"members:\n  - a\n", "line 2: a member must be a mapping"},
		"list iid":      {"members:\n  - iid: [a]\n    addr: h:1\n", "line 2: iid must be a single value"},
		"bad yaml":      {"members:\n  - iid: a\n   addr: [\n", "yaml: line"},
		"twice":         {"members:\n  - iid: a\n    iid: b\n", `line 3: "iid" given twice (first at line 2)`},
		"scalar root":   {"hello\n", "top level must be a mapping"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := membership.Parse([]byte(tc.in))
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(sample))
	f.Add([]byte("members:\n  - iid: a\n    addr: h:1\n  - iid: a\n    addr: h:2\n"))
	f.Add([]byte("members: &x [*x]\n"))
	f.Add([]byte("a: &a [*a, *a]\n"))
	f.Add([]byte("members:\n  - {iid: a, addr: 'h:1', channels: {x: 65535}}\n"))
	f.Add([]byte("\t"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ms, err := membership.Parse(data)
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, m := range ms {
			require.NotEmpty(t, m.IID)
			require.NotEmpty(t, m.Addr)
			require.False(t, seen[m.IID], "duplicate iid %q accepted", m.IID)
			seen[m.IID] = true
			for _, p := range m.Channels {
				require.NotZero(t, p)
			}
		}
	})
}

func TestStatic(t *testing.T) {
	m := channels.Member{IID: "a", Addr: "h:1", Channels: map[string]uint16{"x": 1}}
	src := membership.Static(m)
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := src.Watch(ctx)
	require.NoError(t, err)
	got := <-ch
	require.Equal(t, []channels.Member{m}, got)
	got[0].Channels["x"] = 9 // callers cannot change the source
	cancel()
	_, ok := <-ch
	require.False(t, ok, "closed with the context")
	ch, err = src.Watch(context.Background())
	require.NoError(t, err)
	require.Equal(t, uint16(1), (<-ch)[0].Channels["x"])
}

func TestDynamic(t *testing.T) {
	d := membership.NewDynamic()
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := d.Watch(ctx)
	require.NoError(t, err)
	require.Empty(t, <-ch)
	a := channels.Member{IID: "a", Addr: "h:1"}
	b := channels.Member{IID: "b", Addr: "h:2"}
	d.Set(a)
	require.Equal(t, []channels.Member{a}, <-ch)
	// A slow watcher skips to the latest list.
	d.Set(a, b)
	d.Set(b)
	require.Equal(t, []channels.Member{b}, <-ch)
	require.Equal(t, []channels.Member{b}, d.Members())
	cancel()
	_, ok := <-ch
	require.False(t, ok)
	d.Set(a) // no watcher left: must not block
}

func TestFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "members.yaml")
	_, err := membership.File(path, time.Millisecond).Watch(context.Background())
	require.ErrorContains(t, err, "members.yaml", "a missing file fails Watch")

	require.NoError(t, os.WriteFile(path, []byte("members:\n  - iid: a\n    addr: h:0\n"), 0o600))
	_, err = membership.File(path, time.Millisecond).Watch(context.Background())
	require.ErrorContains(t, err, path+`: line 2: member "a": addr "h:0": port must be 1-65535`)

	// Replace the file atomically, as deployment tools do, so the poller
	// never sees a half-written file.
	write := func(s string) {
		tmp := path + ".tmp"
		require.NoError(t, os.WriteFile(tmp, []byte(s), 0o600))
		require.NoError(t, os.Rename(tmp, path))
	}
	write("members:\n  - iid: a\n    addr: h:1\n")
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := membership.File(path, 5*time.Millisecond).Watch(ctx)
	require.NoError(t, err)
	require.Equal(t, "a", (<-ch)[0].IID)

	// A broken file keeps the previous list; a comment-only change is not
	// a change; the next real change is published.
	write("members:\n  - iid: a\n    addr: h:1\n  - iid: a\n    addr: h:2\n")
	write("# comment\nmembers:\n  - iid: a\n    addr: h:1\n")
	write("members:\n  - iid: a\n    addr: h:1\n  - iid: b\n    addr: h:2\n")
	got := <-ch
	require.Len(t, got, 2, "the first list sent after the initial one is the new one")
	assert.Equal(t, "b", got[1].IID)

	cancel()
	for range ch { // drains until the poller closes the channel
	}
}
