package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// relayMain is a relay process: for each LISTEN=TARGET argument it accepts
// TCP connections on LISTEN and copies each, both ways, to a new
// connection to TARGET (io.Copy, which splices on Linux), passing on FIN
// and closing both on error. It runs until killed. One is the relayPath;
// two in a chain are the relayChainPath: two proxy processes and three
// kernel TCP connections with nothing else, the floor of any two-proxy
// design whose proxies talk TCP.
//
// With -tls-in (or -tls-out) CERT,KEY,CA the connections it accepts (or
// makes) are mutual TLS 1.3, with the configuration tcpproxy uses; a pair
// with TLS between them is the floor of a two-proxy design with TLS in Go:
// see tlsRelayConn.
func relayMain(args []string) {
	fs := flag.NewFlagSet("relay", flag.ExitOnError)
	tlsIn := fs.String("tls-in", "", "CERT,KEY,CA: accepted connections are mutual TLS")
	tlsOut := fs.String("tls-out", "", "CERT,KEY,CA: connections made are mutual TLS")
	fs.BoolVar(&relayNoSplice, "copy", false, "copy through a buffer rather than splice")
	_ = fs.Parse(args)
	if fs.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: bench -relay [-tls-in CERT,KEY,CA] [-tls-out CERT,KEY,CA] LISTEN=TARGET...")
		os.Exit(2)
	}
	raiseFileLimit(0)
	inCfg, err := relayTLSConfig(*tlsIn, true)
	if err == nil {
		var outCfg *tls.Config
		if outCfg, err = relayTLSConfig(*tlsOut, false); err == nil {
			for _, a := range fs.Args() {
				err = relayListen(a, inCfg, outCfg)
				if err != nil {
					break
				}
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(1)
	}
	select {}
}

// relayTLSConfig is the configuration of -tls-in (server) or -tls-out
// (client) given as CERT,KEY,CA.
func relayTLSConfig(files string, server bool) (*tls.Config, error) {
	if files == "" {
		return nil, nil
	}
	f := strings.Split(files, ",")
	if len(f) != 3 {
		return nil, fmt.Errorf("%q is not CERT,KEY,CA", files)
	}
	cli, srv, err := benchTLSConfigs(f[0], f[1], f[2])
	if server {
		return srv, err
	}
	return cli, err
}

func relayListen(arg string, inCfg, outCfg *tls.Config) error {
	listen, target, ok := strings.Cut(arg, "=")
	if !ok {
		return fmt.Errorf("%q is not LISTEN=TARGET", arg)
	}
	ln, err := net.Listen("tcp4", listen)
	if err != nil {
		return err
	}
	var wrapIn func(net.Conn) (halfCloser, error)
	if inCfg != nil {
		wrapIn = func(c net.Conn) (halfCloser, error) {
			return newTLSRelayConn(c, func(raw net.Conn) *tls.Conn { return tls.Server(raw, inCfg) })
		}
	}
	go relayServe(ln, func() (halfCloser, error) {
		c, err := net.Dial("tcp4", target)
		if err != nil {
			return nil, err
		}
		if outCfg == nil {
			return c.(*net.TCPConn), nil
		}
		return newTLSRelayConn(c, func(raw net.Conn) *tls.Conn { return tls.Client(raw, outCfg) })
	}, wrapIn)
	return nil
}

// relayServe accepts connections on ln (wrapped by wrapIn, if set, for
// TLS), and relays each to a connection made by dial.
func relayServe(ln net.Listener, dial func() (halfCloser, error), wrapIn func(net.Conn) (halfCloser, error)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			os.Exit(1)
		}
		go func() {
			in, ok := c.(halfCloser)
			if wrapIn != nil {
				if in, err = wrapIn(c); err != nil {
					c.Close()
					return
				}
			}
			if !ok && wrapIn == nil {
				c.Close()
				return
			}
			d, err := dial()
			if err != nil {
				in.Close()
				return
			}
			done := make(chan struct{})
			go func() {
				relayCopy(d, in)
				close(done)
			}()
			relayCopy(in, d)
			<-done
			in.Close()
			d.Close()
		}()
	}
}

// tlsRelayConn is a TLS connection whose Write sends the records it makes
// in one write(2): tls.Conn hands each record (at most 16 KiB) to the
// connection below with a Write of its own, a system call and a TCP push
// each; gatherConn collects them during the Write, which then sends them
// together. It also reads ahead, many records per read(2), as tcpproxy's
// sessions do.
type tlsRelayConn struct {
	*tls.Conn
	raw *gatherConn
}

func newTLSRelayConn(c net.Conn, mk func(net.Conn) *tls.Conn) (*tlsRelayConn, error) {
	g := &gatherConn{Conn: c, r: bufio.NewReaderSize(c, relayBuf)}
	tc := mk(g)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		c.Close()
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	return &tlsRelayConn{Conn: tc, raw: g}, nil
}

func (c *tlsRelayConn) Write(p []byte) (int, error) {
	c.raw.start()
	n, err := c.Conn.Write(p)
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// gatherConn is the connection under a tlsRelayConn.
type gatherConn struct {
	net.Conn
	r      *bufio.Reader
	mu     sync.Mutex // the reading side may write too (alerts)
	gather bool
	buf    []byte
}

func (g *gatherConn) Read(p []byte) (int, error) { return g.r.Read(p) }

func (g *gatherConn) start() {
	g.mu.Lock()
	g.gather = true
	g.mu.Unlock()
}

func (g *gatherConn) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gather {
		g.buf = append(g.buf, p...)
		return len(p), nil
	}
	return g.Conn.Write(p)
}

func (g *gatherConn) flush() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.gather = false
	if len(g.buf) == 0 {
		return nil
	}
	_, err := g.Conn.Write(g.buf)
	g.buf = g.buf[:0]
	return err
}

// halfCloser is a connection that can send FIN: a *net.TCPConn, or a
// gVisor connection of the tun relay.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// relayNoSplice makes relayCopy copy between kernel sockets too (-copy).
var relayNoSplice bool

// relayBuf is the copy buffer between a gVisor and a kernel connection,
// as large as tcpproxy's bulk buffers.
const relayBuf = 256 << 10

// relayCopy copies src to dst, then half-closes dst; on an error it closes
// both, which ends the other direction too. Between kernel sockets it
// splices (io.Copy); otherwise it copies through a buffer.
func relayCopy(dst, src halfCloser) {
	var err error
	_, tcpDst := dst.(*net.TCPConn)
	if _, tcpSrc := src.(*net.TCPConn); tcpSrc && tcpDst && !relayNoSplice {
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
