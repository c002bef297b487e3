package channels_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
)

func TestTCPTransportSameHostUsesUnixSocket(t *testing.T) {
	for _, tc := range []struct{ listen, dial string }{
		{"127.0.0.1:0", "127.0.0.1"},
		{"0.0.0.0:0", "127.0.0.1"},
		{"[::1]:0", "::1"},
		{"[::]:0", "::1"},
		{"[::]:0", "127.0.0.1"},
	} {
		t.Run(tc.listen+"→"+tc.dial, func(t *testing.T) {
			tr := channels.TCPTransport()
			ln, err := tr.Listen(tc.listen)
			if err != nil && strings.Contains(tc.listen, "::") {
				t.Skipf("no IPv6 here: %v", err)
			}
			require.NoError(t, err)
			acc := accepting(t, ln)
			addr := net.JoinHostPort(tc.dial, portOf(t, ln.Addr()))

			dialOver(t, tr, acc, addr, &net.UnixConn{}, "a peer on this host is reached over a Unix socket")

			// The same listener still takes TCP, from a peer elsewhere
			// or one with the shortcut turned off.
			dialOver(t, channels.PlainTCPTransport(), acc, addr, &net.TCPConn{})
		})
	}
}

// listenAs listens on the abstract Unix socket name as user uid, which
// the kernel records as the socket's owner (SO_PEERCRED), with a backlog
// of 8 connections. Only this thread changes its effective user, and only
// for the three system calls.
func listenAs(t *testing.T, uid int, name string) net.Listener {
	return listenAsBacklog(t, uid, name, 8)
}

func listenAsBacklog(t *testing.T, uid int, name string, backlog int) net.Listener {
	t.Helper()
	fd, err := func() (int, error) {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			return -1, e
		}
		defer func() {
			if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0)); e != 0 {
				panic("cannot become root again: " + e.Error())
			}
		}()
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		if err := unix.Bind(fd, &unix.SockaddrUnix{Name: name}); err != nil {
			unix.Close(fd)
			return -1, err
		}
		if err := unix.Listen(fd, backlog); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	}()
	require.NoError(t, err)
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	ln, err := net.FileListener(f)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// A process of another user that takes a peer's same-host socket name
// first does not get the peer's sessions: the dialer goes over TCP.
func TestTCPTransportIgnoresSocketOfAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to listen as another user")
	}
	ln, err := channels.PlainTCPTransport().Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	name := "@tcpproxy/session/" + addr

	squatter := listenAs(t, 65534, name)
	logged := make(chan string, 16)
	tr := channels.TransportLogging(channels.TCPTransport(), slog.New(messages(logged)))
	dialOver(t, tr, accepting(t, ln), addr, &net.TCPConn{}, "the squatter's socket is not used")
	require.Contains(t, drain(logged), "same-host socket not used; dialing over TCP")

	// The control: the same socket owned by this process's user is used.
	require.NoError(t, squatter.Close())
	own := listenAs(t, os.Geteuid(), name)
	dialOver(t, channels.TCPTransport(), accepting(t, own), addr, &net.UnixConn{})
}

// A same-host socket that does not accept (its backlog is full) does not
// hold a dial up: the dial goes over TCP.
func TestTCPTransportSameHostSocketNotAccepting(t *testing.T) {
	ln, err := channels.PlainTCPTransport().Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	stuck := listenAsBacklog(t, os.Geteuid(), "@tcpproxy/session/"+addr, 0)
	// A backlog of 0 holds one connection; the next connect waits.
	c, err := net.Dial("unix", stuck.Addr().String())
	require.NoError(t, err)
	defer c.Close()

	dialOver(t, channels.TCPTransport(), accepting(t, ln), addr, &net.TCPConn{})
}

// A dialer that cannot give the same-host socket a large send buffer (a
// process without CAP_NET_ADMIN, where net.core.wmem_max is small) uses
// TCP, which grows its own.
func TestTCPTransportNeedsLargeSendBuffer(t *testing.T) {
	tr := channels.TCPTransport()
	ln, err := tr.Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr, acc := ln.Addr().String(), accepting(t, ln)
	dialOver(t, tr, acc, addr, &net.UnixConn{}, "the control: the buffer asked for suffices")

	defer channels.SetSameHostMinSendBuffer(1 << 30)()
	logged := make(chan string, 16)
	dialOver(t, channels.TransportLogging(tr, slog.New(messages(logged))), acc, addr, &net.TCPConn{})
	require.Contains(t, drain(logged), "same-host socket not used; dialing over TCP")
}

// A listener whose same-host socket name is taken says so, and still
// listens on TCP.
func TestTCPTransportSameHostNameTaken(t *testing.T) {
	ln, err := channels.PlainTCPTransport().Listen("127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	taken, err := net.Listen("unix", "@tcpproxy/session/"+addr)
	require.NoError(t, err)
	defer taken.Close()
	require.NoError(t, ln.Close()) // frees the port, not the name

	logged := make(chan string, 16)
	tr := channels.TransportLogging(channels.TCPTransport(), slog.New(messages(logged)))
	ln, err = tr.Listen(addr)
	if err != nil {
		t.Skipf("port %s taken again meanwhile: %v", addr, err)
	}
	require.Contains(t, drain(logged), "same-host socket unavailable; proxies on this host will reach this one over TCP")
	dialOver(t, channels.PlainTCPTransport(), accepting(t, ln), addr, &net.TCPConn{})
}

// drain returns the messages in ch now.
func drain(ch <-chan string) []string {
	var out []string
	for {
		select {
		case m := <-ch:
			out = append(out, m)
		default:
			return out
		}
	}
}

// A same-host connection that its dialer closes unused (it did not take
// the socket) is no failed handshake for the listener; a TCP connection
// closed the same way is (the control).
func TestUnusedSameHostConnectionIsNoFailedHandshake(t *testing.T) {
	handshakes := make(chan error, 4)
	logged := make(chan string, 16)
	cfg := baseConfig("a", channels.TCPTransport(), nil)
	cfg.Logger = slog.New(messages(logged))
	cfg.OnHandshake = func(_ string, dialed bool, _ time.Duration, err error) {
		if !dialed {
			handshakes <- err
		}
	}
	n := startNode(t, cfg, nil)

	c, err := net.Dial("unix", "@tcpproxy/session/"+n.Addr())
	require.NoError(t, err)
	require.NoError(t, c.Close())
	timeout := time.After(5 * time.Second)
	for seen := false; !seen; {
		select {
		case msg := <-logged:
			seen = msg == "same-host connection closed unused by its dialer"
		case err := <-handshakes:
			t.Fatalf("the unused same-host connection was taken for a handshake: %v", err)
		case <-timeout:
			t.Fatal("the unused same-host connection was not noticed")
		}
	}
	require.Empty(t, handshakes, "the unused same-host connection counts as a handshake")

	c, err = net.Dial("tcp", n.Addr())
	require.NoError(t, err)
	require.NoError(t, c.Close())
	require.ErrorIs(t, <-handshakes, io.EOF, "the TCP connection's handshake failed")
}

// messages is a slog.Handler that sends each record's message to ch,
// dropping it when ch is full.
type messages chan<- string

func (h messages) Enabled(context.Context, slog.Level) bool { return true }
func (h messages) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h messages) WithGroup(string) slog.Handler            { return h }
func (h messages) Handle(_ context.Context, r slog.Record) error {
	select {
	case h <- r.Message:
	default:
	}
	return nil
}

// Nodes report their sessions by network: the same-host socket is "unix".
func TestNodeSessionsByNet(t *testing.T) {
	for _, tc := range []struct {
		name string
		tr   channels.Transport
		want string
	}{
		{"same-host", channels.TCPTransport(), "unix"},
		{"plain", channels.PlainTCPTransport(), "tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, reply, a, b := pair(t, tc.tr, nil)
			s, in := open(t, req, reply)
			defer s.Close()
			defer in.Stream.Close()
			for _, n := range []*channels.Node{a, b} {
				byNet := n.SessionsByNet()
				require.Len(t, byNet, 1, "%v", byNet)
				require.Positive(t, byNet[tc.want], "%v", byNet)
				// (A second session may come up meanwhile: Sessions is
				// not compared with the map.)
				require.Positive(t, n.Sessions())
			}
		})
	}
}
