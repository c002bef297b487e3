package channels_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/membership"
	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/pki"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// refusals counts Config.OnRefused calls by reason.
type refusals struct {
	mu sync.Mutex
	by map[string]int
}

func (r *refusals) add(x channels.Refusal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.by == nil {
		r.by = make(map[string]int)
	}
	r.by[x.Reason]++
}

// wait waits until the counts are want: a node reports a refusal after
// it has answered and hung up.
func (r *refusals) wait(t *testing.T, want map[string]int) {
	t.Helper()
	require.Eventually(t, func() bool { return assert.ObjectsAreEqual(want, r.get()) },
		5*time.Second, 5*time.Millisecond, "refusals: want %v, got %v", want, r.get())
	assert.Equal(t, want, r.get())
}

func (r *refusals) get() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.by)
}

// onHost is a node config for a node on the host with address ip of mt,
// listening on ip:7000.
func onHost(iid string, mt *channels.MemoryTransport, ip string, src channels.Source) channels.Config {
	cfg := baseConfig(iid, mt.From(netip.MustParseAddr(ip)), src)
	cfg.ListenAddr = ip + ":7000"
	return cfg
}

// captured counts the streams that nodes sent to impostors.
type captured struct {
	mu sync.Mutex
	n  int
}

func (c *captured) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// impostor does a handshake as h on c, a connection to a node. If the
// node accepts, it keeps the session and counts in got the streams the
// node sends on it. It returns the node's answer, or the error that ended
// the handshake (a TLS refusal).
func impostor(t *testing.T, c net.Conn, h wire.Hello, got *captured) (wire.Reply, error) {
	t.Helper()
	if err := wire.WriteHello(c, h); err != nil {
		return wire.Reply{}, err
	}
	rp, err := wire.ReadReply(c)
	if err != nil || !rp.Accepted {
		return rp, err
	}
	require.NoError(t, c.SetDeadline(time.Time{}))
	sess, err := mux.Client(c, mux.Config{Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			st, err := sess.AcceptStream(context.Background())
			if err != nil {
				return
			}
			got.mu.Lock()
			got.n++
			got.mu.Unlock()
			st.Reset()
		}
	}()
	t.Cleanup(func() { sess.Close(); <-done })
	return rp, nil
}

// sendThrough opens k streams on req and checks that each reaches reply
// from iid "from", with its bytes.
func sendThrough(t *testing.T, req channels.RequestChannel, reply channels.ReplyChannel, to, from string, k int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i := range k {
		s, m, err := req.Open(ctx, channels.Header{SourcePort: uint16(1000 + i)})
		require.NoError(t, err)
		require.Equal(t, to, m.IID)
		_, err = s.Write([]byte("ping"))
		require.NoError(t, err)
		require.NoError(t, s.CloseWrite())
		in, err := reply.Accept(ctx)
		require.NoError(t, err)
		assert.Equal(t, from, in.Peer.IID)
		assert.Equal(t, uint16(1000+i), in.Header.SourcePort)
		got, err := io.ReadAll(in.Stream)
		require.NoError(t, err)
		require.Equal(t, "ping", string(got))
		require.NoError(t, in.Stream.Close())
		require.NoError(t, s.Close())
	}
}

// TestPlaintextImpostorsRefused puts a client and a server proxy on two
// hosts, with sessions in plaintext (Insecure), and a third host that
// claims to be each of them and to be a stranger: every claim is refused,
// and all the client's streams reach the real server, none the impostor.
func TestPlaintextImpostorsRefused(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	mt := channels.NewMemoryTransport()
	svc := map[string]uint16{"svc": 80}
	members := membership.Static(
		channels.Member{IID: "cli", Role: "test", Addr: "10.0.0.1:7000"},
		channels.Member{IID: "srv", Role: "test", Addr: "10.0.0.2:7000", Channels: svc},
		channels.Member{IID: "dialer", Role: "test"}, // dials only: no address
	)
	var seen refusals
	var reply channels.ReplyChannel
	scfg := onHost("srv", mt, "10.0.0.2", members)
	scfg.Insecure, scfg.OnRefused = true, seen.add
	startNode(t, scfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	var req channels.RequestChannel
	ccfg := onHost("cli", mt, "10.0.0.1", members)
	ccfg.Insecure, ccfg.OnRefused = true, seen.add
	startNode(t, ccfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})

	evil := mt.From(netip.MustParseAddr("10.0.0.9"))
	var got captured
	for _, tc := range []struct {
		name, addr string
		hello      wire.Hello
		want       string
	}{
		{"impostor of the server, at the client", "10.0.0.1:7000", wire.Hello{IID: "srv", Role: "test", Channels: []string{"svc"}}, "not from the member's address 10.0.0.2:7000"},
		{"impostor of the client, at the server", "10.0.0.2:7000", wire.Hello{IID: "cli", Role: "test"}, "not from the member's address 10.0.0.1:7000"},
		{"stranger at the server", "10.0.0.2:7000", wire.Hello{IID: "evil", Role: "test"}, `"evil" (role "test") is not a member`},
		{"a member without address, from another host", "10.0.0.2:7000", wire.Hello{IID: "dialer", Role: "test"}, "the member has no address to check it against"},
		{"stranger at the client", "10.0.0.1:7000", wire.Hello{IID: "evil", Role: "test", Channels: []string{"svc"}}, "is not a member"},
	} {
		rp, err := impostor(t, rawDial(t, evil, tc.addr), tc.hello, &got)
		require.NoError(t, err)
		if assert.False(t, rp.Accepted, tc.name) {
			assert.Contains(t, rp.Reason, tc.want, tc.name)
		}
	}

	// The client's streams go to the real server, whatever sessions the
	// impostors tried to slip in.
	sendThrough(t, req, reply, "srv", "cli", 6)
	assert.Zero(t, got.get(), "streams sent to an impostor")
	seen.wait(t, map[string]int{channels.RefusedAddress: 3, channels.RefusedNotMember: 2})
}

// TestPlaintextAcrossHostsNeedsInsecure: without TLS and without
// Insecure, a node neither dials nor accepts a peer on another host.
func TestPlaintextAcrossHostsNeedsInsecure(t *testing.T) {
	mt := channels.NewMemoryTransport()
	members := membership.Static(
		channels.Member{IID: "cli", Role: "test", Addr: "10.0.0.1:7000"},
		channels.Member{IID: "srv", Role: "test", Addr: "10.0.0.2:7000", Channels: map[string]uint16{"svc": 80}},
	)
	var seen refusals
	scfg := onHost("srv", mt, "10.0.0.2", members)
	scfg.OnRefused = seen.add
	startNode(t, scfg, func(n *channels.Node) {
		_, err := n.Reply("svc")
		require.NoError(t, err)
	})
	var req channels.RequestChannel
	ccfg := onHost("cli", mt, "10.0.0.1", members)
	ccfg.OnRefused = seen.add
	startNode(t, ccfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})
	_, _, err := req.Open(context.Background(), channels.Header{})
	require.ErrorIs(t, err, channels.ErrNoMembers)
	require.ErrorContains(t, err, "no TLS for a session with a peer outside this network namespace")

	// The real client, dialing by hand: refused for want of TLS too.
	rp, err := impostor(t, rawDial(t, mt.From(netip.MustParseAddr("10.0.0.1")), "10.0.0.2:7000"), wire.Hello{IID: "cli", Role: "test"}, new(captured))
	require.NoError(t, err)
	require.False(t, rp.Accepted)
	require.Contains(t, rp.Reason, "no TLS")
	seen.wait(t, map[string]int{channels.RefusedPlaintext: 2})
}

// TestTLSImpostorsRefused: with mutual TLS, a peer with a certificate of
// another CA, or of the mesh's CA for another instance, cannot pass for a
// member, nor get in as a stranger; the client's streams all reach the
// real server.
func TestTLSImpostorsRefused(t *testing.T) {
	defer channels.SetMemberGrace(0)() // strangers are refused at once
	dir := t.TempDir()
	caFile, files := writeCerts(t, dir, "cli", "srv", "evil")
	otherDir := t.TempDir()
	_, otherFiles := writeCerts(t, otherDir, "srv")
	credsFor := func(f [2]string) pki.Credentials {
		c, err := channels.TLSConfigFromFiles(f[0], f[1], caFile)
		require.NoError(t, err)
		return c
	}
	// The impostor presents a certificate and does not care who answers.
	tlsFor := func(f [2]string) *tls.Config {
		cert, err := tls.LoadX509KeyPair(f[0], f[1])
		require.NoError(t, err)
		return &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	}
	tr := channels.PlainTCPTransport()
	var seen refusals
	var reply channels.ReplyChannel
	srvCfg := baseConfig("srv", tr, dialers("cli"))
	srvCfg.TLS, srvCfg.OnRefused = credsFor(files["srv"]), seen.add
	srv := startNode(t, srvCfg, func(n *channels.Node) {
		var err error
		reply, err = n.Reply("svc")
		require.NoError(t, err)
	})
	var req channels.RequestChannel
	cliCfg := baseConfig("cli", tr, membership.Static(member(srv, "srv", map[string]uint16{"svc": 80})))
	cliCfg.TLS, cliCfg.OnRefused = credsFor(files["cli"]), seen.add
	cli := startNode(t, cliCfg, func(n *channels.Node) {
		var err error
		req, err = n.Request("svc", "", nil)
		require.NoError(t, err)
	})

	var got captured
	srvHello := wire.Hello{IID: "srv", Role: "test", Channels: []string{"svc"}}
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		to   string
		h    wire.Hello
	}{
		{"another CA's certificate for srv", tlsFor(otherFiles["srv"]), cli.Addr(), srvHello},
		{"the CA's certificate for evil, claiming srv", tlsFor(files["evil"]), cli.Addr(), srvHello},
		{"the CA's certificate for evil, at the client", tlsFor(files["evil"]), cli.Addr(), wire.Hello{IID: "evil", Role: "test"}},
		{"the CA's certificate for evil, at the server", tlsFor(files["evil"]), srv.Addr(), wire.Hello{IID: "evil", Role: "test"}},
	} {
		c := tls.Client(rawDial(t, tr, tc.to), tc.cfg)
		rp, err := impostor(t, c, tc.h, &got)
		assert.True(t, err != nil || !rp.Accepted, "%s: accepted", tc.name)
	}
	sendThrough(t, req, reply, "srv", "cli", 6)
	assert.Zero(t, got.get(), "streams sent to an impostor")
	seen.wait(t, map[string]int{channels.RefusedTLS: 1, channels.RefusedIdentity: 1, channels.RefusedNotMember: 2})
}

// farTransport is TCP on loopback whose connections say they come from,
// and go to, another host (192.0.2.1), as connections between hosts do.
type farTransport struct{ channels.Transport }

type farConn struct{ net.Conn }

type farListener struct{ net.Listener }

func (farConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7000} }

func (l farListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return farConn{c}, nil
}

func (f farTransport) Listen(addr string) (net.Listener, error) {
	ln, err := f.Transport.Listen(addr)
	if err != nil {
		return nil, err
	}
	return farListener{ln}, nil
}

func (f farTransport) Dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := f.Transport.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return farConn{c}, nil
}

// TestTLSAcrossHosts: with TLS, nodes on different hosts hold sessions
// without Insecure; without TLS they would not.
func TestTLSAcrossHosts(t *testing.T) {
	caFile, files := writeCerts(t, t.TempDir(), "a", "b")
	for _, withTLS := range []bool{true, false} {
		t.Run(fmt.Sprintf("tls=%v", withTLS), func(t *testing.T) {
			req, reply, _, _ := pair(t, farTransport{channels.PlainTCPTransport()}, func(c *channels.Config) {
				if withTLS {
					f := files[c.IID]
					var err error
					c.TLS, err = channels.TLSConfigFromFiles(f[0], f[1], caFile)
					require.NoError(t, err)
				}
			})
			if !withTLS {
				_, _, err := req.Open(context.Background(), channels.Header{})
				require.ErrorContains(t, err, "no TLS for a session with a peer outside this network namespace")
				return
			}
			sendThrough(t, req, reply, "b", "a", 3)
		})
	}
}
