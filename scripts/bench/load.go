package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// servers are the bench's own legacy servers, in the bench process: echo
// (answers every byte it reads) and sink (reads everything, answers one
// byte at EOF). Every path ends at them; each path's server side may need
// them on its own IP, always on the same two ports.
type servers struct {
	echoPort, sinkPort int

	mu    sync.Mutex
	ips   map[netip.Addr]bool // where both servers listen
	lns   []net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newServers() (*servers, error) {
	s := &servers{conns: make(map[net.Conn]struct{}), ips: map[netip.Addr]bool{netip.MustParseAddr("127.0.0.1"): true}}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.echoPort = ln.Addr().(*net.TCPAddr).Port
	s.serve(ln, echo)
	ln, err = net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		s.close()
		return nil, err
	}
	s.sinkPort = ln.Addr().(*net.TCPAddr).Port
	s.serve(ln, sink)
	return s, nil
}

// listenOn adds listeners for both servers on ip (127.0.0.1 is always on).
func (s *servers) listenOn(ip netip.Addr) error {
	s.mu.Lock()
	done := s.ips[ip]
	s.ips[ip] = true
	s.mu.Unlock()
	if done {
		return nil
	}
	for _, h := range []struct {
		port int
		f    func(net.Conn)
	}{{s.echoPort, echo}, {s.sinkPort, sink}} {
		ln, err := net.Listen("tcp4", netip.AddrPortFrom(ip, uint16(h.port)).String())
		if err != nil {
			return fmt.Errorf("server listen on %s: %w", ip, err)
		}
		s.serve(ln, h.f)
	}
	return nil
}

func (s *servers) serve(ln net.Listener, handler func(net.Conn)) {
	s.mu.Lock()
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(5 * time.Millisecond) // EMFILE and the like
				continue
			}
			s.mu.Lock()
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			go func() {
				defer func() {
					c.Close()
					s.mu.Lock()
					delete(s.conns, c)
					s.mu.Unlock()
				}()
				handler(c)
			}()
		}
	})
}

func (s *servers) close() {
	s.mu.Lock()
	for _, ln := range s.lns {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// echo writes back whatever it reads until EOF.
func echo(c net.Conn) {
	buf := make([]byte, 4<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// sink reads everything with large reads and answers one byte at EOF.
func sink(c net.Conn) {
	buf := make([]byte, 256<<10)
	for {
		_, err := c.Read(buf)
		if errors.Is(err, io.EOF) {
			_, _ = c.Write([]byte{1})
			return
		}
		if err != nil {
			return
		}
	}
}

// conn is a client connection of the load generator: a kernel socket, or
// a gVisor one for the memory network.
type conn interface {
	net.Conn
	CloseWrite() error
}

// dialFunc connects the load generator to addr (ip:port).
type dialFunc func(ctx context.Context, addr string) (conn, error)

var dialer = net.Dialer{Timeout: 5 * time.Second}

// kernelDial connects with a socket of the bench's network namespace.
func kernelDial(ctx context.Context, addr string) (conn, error) {
	c, err := dialer.DialContext(ctx, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// bulk sends size bytes on each of parallel connections to a sink and
// returns the aggregate throughput in MiB/s, counted until every sink has
// acknowledged the end of its data.
func bulk(ctx context.Context, dial dialFunc, addr string, size int64, parallel int, timeout time.Duration) (float64, error) {
	deadline := time.Now().Add(timeout)
	conns := make([]conn, parallel)
	for i := range conns {
		c, err := dial(ctx, addr)
		if err != nil {
			closeAll(conns)
			return 0, err
		}
		_ = c.SetDeadline(deadline)
		conns[i] = c
	}
	defer closeAll(conns)
	start := time.Now()
	errs := make([]error, parallel)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			buf := make([]byte, 256<<10)
			for left := size; left > 0; {
				n := int64(len(buf))
				if left < n {
					n = left
				}
				if _, err := c.Write(buf[:n]); err != nil {
					errs[i] = fmt.Errorf("bulk write: %w", err)
					return
				}
				left -= n
				if ctx.Err() != nil {
					errs[i] = ctx.Err()
					return
				}
			}
			if err := c.CloseWrite(); err != nil {
				errs[i] = err
				return
			}
			var ack [1]byte
			if _, err := io.ReadFull(c, ack[:]); err != nil {
				errs[i] = fmt.Errorf("bulk ack: %w", err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(size) * float64(parallel) / (1 << 20) / elapsed.Seconds(), nil
}

func closeAll(cs []conn) {
	for _, c := range cs {
		if c != nil {
			c.Close()
		}
	}
}

// latencies holds round-trip times in percentiles.
type latencies struct{ p50, p99, p999 time.Duration }

// latency runs clients concurrent connections to an echo server; each
// sends count messages of msgSize bytes one at a time (after a short
// warm-up) and times each round trip.
func latency(ctx context.Context, dial dialFunc, addr string, clients, count, msgSize int, timeout time.Duration) (latencies, error) {
	deadline := time.Now().Add(timeout)
	conns := make([]conn, clients)
	for i := range conns {
		c, err := dial(ctx, addr)
		if err != nil {
			closeAll(conns)
			return latencies{}, err
		}
		_ = c.SetDeadline(deadline)
		conns[i] = c
	}
	defer closeAll(conns)
	samples := make([][]time.Duration, clients)
	errs := make([]error, clients)
	const warmup = 50
	var ready, wg sync.WaitGroup
	startCh := make(chan struct{})
	ready.Add(clients)
	for i, c := range conns {
		wg.Go(func() {
			msg, got := make([]byte, msgSize), make([]byte, msgSize)
			rt := func() error {
				if _, err := c.Write(msg); err != nil {
					return err
				}
				_, err := io.ReadFull(c, got)
				return err
			}
			for range warmup {
				if err := rt(); err != nil {
					errs[i] = fmt.Errorf("warm-up: %w", err)
					ready.Done()
					return
				}
			}
			ready.Done()
			<-startCh
			s := make([]time.Duration, 0, count)
			for range count {
				t0 := time.Now()
				if err := rt(); err != nil {
					errs[i] = err
					return
				}
				s = append(s, time.Since(t0))
				if ctx.Err() != nil {
					errs[i] = ctx.Err()
					return
				}
			}
			samples[i] = s
		})
	}
	ready.Wait()
	close(startCh)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return latencies{}, err
	}
	all := slices.Concat(samples...)
	slices.Sort(all)
	pct := func(p float64) time.Duration {
		i := int(p * float64(len(all)))
		return all[min(i, len(all)-1)]
	}
	return latencies{pct(0.50), pct(0.99), pct(0.999)}, nil
}

// connRate makes total connections from conc workers, each one connect,
// one msgSize round trip to the echo server, close, and returns
// connections per second.
func connRate(ctx context.Context, dial dialFunc, addr string, total, conc, msgSize int, timeout time.Duration) (float64, error) {
	deadline := time.Now().Add(timeout)
	var next atomic.Int64
	errs := make([]error, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range conc {
		wg.Go(func() {
			msg, got := make([]byte, msgSize), make([]byte, msgSize)
			for next.Add(1) <= int64(total) {
				if time.Now().After(deadline) || ctx.Err() != nil {
					errs[w] = fmt.Errorf("connection rate: stopped after %v (-timeout)", timeout)
					return
				}
				c, err := dial(ctx, addr)
				if err != nil {
					errs[w] = err
					return
				}
				_ = c.SetDeadline(deadline)
				_, err = c.Write(msg)
				if err == nil {
					_, err = io.ReadFull(c, got)
				}
				c.Close()
				if err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(total) / elapsed.Seconds(), nil
}

// openIdle opens n connections to the echo server from conc workers, each
// checked with one msgSize round trip so that the whole path exists, and
// returns them open and idle.
func openIdle(ctx context.Context, dial dialFunc, addr string, n, conc, msgSize int, timeout time.Duration) ([]conn, error) {
	deadline := time.Now().Add(timeout)
	conns := make([]conn, n)
	var next atomic.Int64
	errs := make([]error, conc)
	var wg sync.WaitGroup
	for w := range conc {
		wg.Go(func() {
			msg, got := make([]byte, msgSize), make([]byte, msgSize)
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				if time.Now().After(deadline) || ctx.Err() != nil {
					errs[w] = fmt.Errorf("idle connections: %d opened in %v (-timeout)", i, timeout)
					return
				}
				c, err := dial(ctx, addr)
				if err != nil {
					errs[w] = fmt.Errorf("idle connection %d: %w", i, err)
					return
				}
				conns[i] = c
				_ = c.SetDeadline(deadline)
				_, err = c.Write(msg)
				if err == nil {
					_, err = io.ReadFull(c, got)
				}
				if err != nil {
					errs[w] = fmt.Errorf("idle connection %d: %w", i, err)
					return
				}
				_ = c.SetDeadline(time.Time{})
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

// roundTrip checks a path end to end once.
func roundTrip(ctx context.Context, dial dialFunc, addr string) error {
	c, err := dial(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	msg := []byte("ping through the path")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo returned %q", got)
	}
	return nil
}

// serverProc is the bench's servers running in a child process (the bench
// binary with -serve), so that the descriptors of their ends of the idle
// connections do not count against the bench's own RLIMIT_NOFILE.
type serverProc struct {
	echoPort, sinkPort int
	child              *child
}

// startServers re-executes the bench as the server process, listening on
// ips, and reads the two ports it chose.
func startServers(kids *children, dir string, ips []netip.Addr) (*serverProc, error) {
	return startServersWith(kids, dir, "servers", nil, ips)
}

// startServersWith starts a server process named name, its command line
// prefixed with pre (e.g. `ip netns exec NS`).
func startServersWith(kids *children, dir, name string, pre []string, ips []netip.Addr) (*serverProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := slices.Concat(pre, []string{exe, "-serve"})
	for _, ip := range ips {
		args = append(args, ip.String())
	}
	portsFile := filepath.Join(dir, name+"-ports")
	c, err := kids.start(name, dir, append(args, portsFile)...)
	if err != nil {
		return nil, err
	}
	sp := &serverProc{child: c}
	err = waitFor(context.Background(), 10*time.Second, func() error {
		if c.exited() {
			return fmt.Errorf("server process exited: %v\n%s", c.err, c.tail())
		}
		b, err := os.ReadFile(portsFile)
		if err != nil {
			return err
		}
		if _, err := fmt.Sscanf(string(b), "%d %d\n", &sp.echoPort, &sp.sinkPort); err != nil {
			return fmt.Errorf("ports file %q: %w", b, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return sp, nil
}

// serveMain is the server process: it serves on every address given,
// writes "echoPort sinkPort" to the last argument (a file) once
// listening, and runs until killed.
func serveMain(args []string) {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench -serve IP... PORTSFILE")
		os.Exit(2)
	}
	raiseFileLimit(0)
	srv, err := newServers()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, a := range args[:len(args)-1] {
		ip, err := netip.ParseAddr(a)
		if err == nil {
			err = srv.listenOn(ip)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	out := args[len(args)-1]
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, fmt.Appendf(nil, "%d %d\n", srv.echoPort, srv.sinkPort), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := os.Rename(tmp, out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	select {}
}
