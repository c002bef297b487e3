package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
)

// relayMain is a relay process: for each LISTEN=TARGET argument it accepts
// TCP connections on LISTEN and copies each, both ways, to a new
// connection to TARGET (io.Copy, which splices on Linux), passing on FIN
// and closing both on error. It runs until killed. One is the relayPath;
// two in a chain are the relayChainPath: two proxy processes and three
// kernel TCP connections with nothing else, the floor of any two-proxy
// design whose proxies talk TCP.
func relayMain(args []string) {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: bench -relay LISTEN=TARGET...")
		os.Exit(2)
	}
	raiseFileLimit(0)
	for _, a := range args {
		listen, target, ok := strings.Cut(a, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "relay: %q is not LISTEN=TARGET\n", a)
			os.Exit(2)
		}
		ln, err := net.Listen("tcp4", listen)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go relayServe(ln, target)
	}
	select {}
}

func relayServe(ln net.Listener, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			os.Exit(1)
		}
		go func() {
			d, err := net.Dial("tcp4", target)
			if err != nil {
				c.Close()
				return
			}
			done := make(chan struct{})
			go func() {
				relayCopy(d.(halfCloser), c.(halfCloser))
				close(done)
			}()
			relayCopy(c.(halfCloser), d.(halfCloser))
			<-done
			c.Close()
			d.Close()
		}()
	}
}

// halfCloser is a connection that can send FIN: a *net.TCPConn, or a
// gVisor connection of the tun relay.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// relayBuf is the copy buffer between a gVisor and a kernel connection,
// as large as tcpproxy's bulk buffers.
const relayBuf = 256 << 10

// relayCopy copies src to dst, then half-closes dst; on an error it closes
// both, which ends the other direction too. Between kernel sockets it
// splices (io.Copy); otherwise it copies through a buffer.
func relayCopy(dst, src halfCloser) {
	var err error
	_, tcpDst := dst.(*net.TCPConn)
	if _, tcpSrc := src.(*net.TCPConn); tcpSrc && tcpDst {
		_, err = io.Copy(dst, src)
	} else {
		// Plain Reader and Writer: io.CopyBuffer would otherwise hand the
		// work to a ReadFrom or WriteTo with their own 32 KiB buffers.
		_, err = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, relayBuf))
	}
	if err != nil {
		dst.Close()
		src.Close()
		return
	}
	_ = dst.CloseWrite()
}

// relayPath is load generator → one relay → servers: one proxy process
// and two kernel TCP connections joined by splice(2): the least CPU per
// byte that a user-space proxy terminating TCP spends, which no
// two-process design can undercut.
func relayPath(e *env) *path {
	return &path{
		key: "relay1", name: "one Go relay (io.Copy, the floor of any proxy)",
		memoryNote: "n/a (baseline)",
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(2)
			if err != nil {
				return err
			}
			echo, sink := fmt.Sprintf("127.0.0.1:%d", ports[0]), fmt.Sprintf("127.0.0.1:%d", ports[1])
			if err := e.startRelay(p, "relay", echo, fmt.Sprintf("127.0.0.1:%d", e.srv.echoPort), sink, fmt.Sprintf("127.0.0.1:%d", e.srv.sinkPort)); err != nil {
				return err
			}
			p.echo, p.sink = echo, sink
			return e.waitReady(ctx, p)
		},
	}
}

// relayChainPath is load generator → relay A → relay B → servers.
func relayChainPath(e *env) *path {
	return &path{
		key: "relay2", name: "two Go relays (io.Copy, no multiplexing)",
		memoryNote: "n/a (baseline)",
		setup: func(ctx context.Context, p *path) error {
			ports, err := freePorts(4)
			if err != nil {
				return err
			}
			bEcho, bSink := fmt.Sprintf("127.0.0.1:%d", ports[0]), fmt.Sprintf("127.0.0.1:%d", ports[1])
			aEcho, aSink := fmt.Sprintf("127.0.0.1:%d", ports[2]), fmt.Sprintf("127.0.0.1:%d", ports[3])
			if err := e.startRelay(p, "relay-b", bEcho, fmt.Sprintf("127.0.0.1:%d", e.srv.echoPort), bSink, fmt.Sprintf("127.0.0.1:%d", e.srv.sinkPort)); err != nil {
				return err
			}
			if err := e.startRelay(p, "relay-a", aEcho, bEcho, aSink, bSink); err != nil {
				return err
			}
			p.echo, p.sink = aEcho, aSink
			return e.waitReady(ctx, p)
		},
	}
}

// startRelay starts a relay process (this program with -relay) for p,
// from echoFrom to echoTo and from sinkFrom to sinkTo.
func (e *env) startRelay(p *path, name, echoFrom, echoTo, sinkFrom, sinkTo string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	c, err := e.kids.start(fmt.Sprintf("%s-%d", name, e.rep), e.dir, exe, "-relay", echoFrom+"="+echoTo, sinkFrom+"="+sinkTo)
	if err != nil {
		return err
	}
	p.procs = append(p.procs, c)
	return nil
}
