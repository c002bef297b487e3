package channels_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testLogger discards logs unless CHANNELS_TEST_LOG is set, in which case
// they go to stderr at debug level.
func testLogger() *slog.Logger {
	if os.Getenv("CHANNELS_TEST_LOG") == "" {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// baseConfig returns a node config tuned for fast tests.
func baseConfig(iid string, tr channels.Transport, src channels.Source) channels.Config {
	return channels.Config{
		IID:              iid,
		Role:             "test",
		ListenAddr:       "127.0.0.1:0",
		Transport:        tr,
		Members:          src,
		Logger:           testLogger(),
		DialTimeout:      2 * time.Second,
		HandshakeTimeout: 2 * time.Second,
		BackoffMin:       10 * time.Millisecond,
		BackoffMax:       100 * time.Millisecond,
	}
}

// startNode creates a node, lets register add channels, starts it and
// closes it at the end of the test.
func startNode(t testing.TB, cfg channels.Config, register func(n *channels.Node)) *channels.Node {
	t.Helper()
	n, err := channels.NewNode(cfg)
	require.NoError(t, err)
	if register != nil {
		register(n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, n.Start(ctx))
	t.Cleanup(func() { require.NoError(t, n.Close()) })
	return n
}

func member(n *channels.Node, iid string, chans map[string]uint16) channels.Member {
	return channels.Member{IID: iid, Role: "test", Addr: n.Addr(), Channels: chans}
}

// dialers is the membership of a node that only the nodes iids (role
// "test", no address: they do not listen) dial.
func dialers(iids ...string) channels.Source {
	var ms []channels.Member
	for _, iid := range iids {
		ms = append(ms, channels.Member{IID: iid, Role: "test"})
	}
	return membership.Static(ms...)
}

// pair starts a server node "b" with a reply channel "svc" and a client
// node "a" with a request channel "svc" targeting it, over tr.
func pair(t testing.TB, tr channels.Transport, tune func(*channels.Config)) (channels.RequestChannel, channels.ReplyChannel, *channels.Node, *channels.Node) {
	t.Helper()
	var reply channels.ReplyChannel
	// a dials b, and so do the nodes some tests add (c, d).
	cb := baseConfig("b", tr, dialers("a", "c", "d"))
	if tune != nil {
		tune(&cb)
	}
	b := startNode(t, cb, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	var req channels.RequestChannel
	ca := baseConfig("a", tr, membership.Static(member(b, "b", map[string]uint16{"svc": 80})))
	ca.ListenAddr = ""
	if tune != nil {
		tune(&ca)
	}
	a := startNode(t, ca, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	return req, reply, a, b
}

// open opens a stream from req and accepts it on reply.
func open(t testing.TB, req channels.RequestChannel, reply channels.ReplyChannel) (channels.Stream, channels.Incoming) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, _, err := req.Open(ctx, channels.Header{SourcePort: 1234, TargetPort: 80})
	require.NoError(t, err)
	in, err := reply.Accept(ctx)
	require.NoError(t, err)
	return s, in
}

// useCerts returns a config tweak that gives each node the mutual TLS
// credentials writeCerts wrote for its IID.
func useCerts(t testing.TB, ca string, files map[string][2]string) func(*channels.Config) {
	return func(c *channels.Config) {
		f := files[c.IID]
		cr, err := channels.TLSConfigFromFiles(f[0], f[1], ca)
		require.NoError(t, err)
		c.TLS = cr
	}
}

// writeCerts creates a throwaway CA and an instance certificate per name
// (identity: that iid with role "test", as baseConfig uses) in dir. It
// returns the CA file and, per name, the cert and key files.
func writeCerts(t testing.TB, dir string, names ...string) (caFile string, files map[string][2]string) {
	t.Helper()
	ca, err := pki.NewCA("tcpproxy test CA", time.Hour)
	require.NoError(t, err)
	require.NoError(t, ca.Save(dir))
	files = make(map[string][2]string)
	for _, name := range names {
		certFile, keyFile, err := ca.WriteInstance(dir, pki.Identity{IID: name, Role: "test"}, []string{"127.0.0.1", "localhost"}, time.Hour)
		require.NoError(t, err)
		files[name] = [2]string{certFile, keyFile}
	}
	return filepath.Join(dir, "ca.pem"), files
}
