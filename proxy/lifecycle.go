package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy/netconn"
)

// proxiedConn is one proxied connection, tracked so that Shutdown can drain it
// and, past its deadline, reset it.
type proxiedConn struct {
	p  *Proxy
	cs *channelState

	mu     sync.Mutex
	legacy netconn.Conn
	stream channels.Stream
	killed bool

	// relaying is set by run, in the goroutine track started, when the
	// relay goroutine took over finishing the conn.
	relaying bool

	// bytes counts the connection's traffic both ways; the idle timer
	// compares it with lastBytes each time it fires.
	bytes     atomic.Int64
	lastBytes int64
	idle      *time.Timer

	// sends counts the relay's sends of legacy data into the stream;
	// sendsSeen is its value at checkStalledSends' previous look (under
	// the proxy's mu).
	sends     sendWatch
	sendsSeen uint32
}

// track runs f in a setup worker (runSetup), with a conn that
// Shutdown can abort. Once Shutdown has begun, or when the channel is at
// its connection limit, it runs refuse instead, in the caller's goroutine.
func (p *Proxy) track(cs *channelState, f func(*proxiedConn), refuse func()) {
	if n := cs.stats.active.Add(1); n > cs.cfg.maxConnections() {
		cs.stats.active.Add(-1)
		cs.stats.refused.Add(1)
		if ok, held := cs.limitLog.allow(time.Now()); ok {
			p.log.Warn("channel at its connection limit; refusing", "channel", cs.name, "limit", cs.cfg.maxConnections(), "suppressed", held)
		}
		refuse()
		return
	}
	pc := &proxiedConn{p: p, cs: cs}
	p.mu.Lock()
	if p.state != stateRunning {
		p.mu.Unlock()
		cs.stats.active.Add(-1)
		refuse()
		return
	}
	p.conns[pc] = struct{}{}
	p.connWG.Add(1)
	p.mu.Unlock()
	cs.stats.total.Add(1)
	p.runSetup(func() {
		defer func() {
			if !pc.relaying {
				pc.finish()
			}
		}()
		f(pc)
	})
}

// Setup workers. A connection's setup (accepting a stream or a legacy
// connection, dialing the legacy server, opening the stream) runs call
// chains deep enough to grow a new goroutine's stack several times, each
// time copying it; then the relay moves to a fresh goroutine, whose stack
// stays small for the connection's life (see proxiedConn.run). A setup
// worker keeps its grown stack from one setup to the next: one that
// finishes waits up to setupIdle for another, then ends, so workers
// follow the rate of new connections and none stays once they stop.
// Measured cross-host (connect, one request, close): stack growth was 6%
// of the client proxy's CPU and 11% of the server proxy's.
const setupIdle = 2 * time.Second

// runSetup runs f in an idle setup worker, or in a new one if none is
// idle. Workers end when the proxy's context does, once idle.
func (p *Proxy) runSetup(f func()) {
	select {
	case p.setups <- f:
		return
	default:
	}
	p.workers.Add(1)
	go p.setupWorker(f)
}

func (p *Proxy) setupWorker(f func()) {
	defer p.workers.Done()
	idle := time.NewTimer(setupIdle)
	defer idle.Stop()
	for {
		f()
		f = nil // let the finished setup's closure go while idle
		idle.Reset(setupIdle)
		select {
		case f = <-p.setups:
		case <-idle.C:
			return
		case <-p.ctx.Done():
			return
		}
	}
}

// finish releases a tracked conn once it is over.
func (pc *proxiedConn) finish() {
	pc.cs.stats.active.Add(-1)
	pc.p.mu.Lock()
	delete(pc.p.conns, pc)
	pc.p.mu.Unlock()
	pc.p.connWG.Done()
}

// run relays legacy and stream unless the conn was killed meanwhile. The
// relay runs in a new goroutine, which finishes the conn, and the caller's
// goroutine ends: its stack grew while dialing or opening the stream, and a
// fresh one is half the size for the connection's life (see
// BenchmarkRequestReplyIdle).
func (pc *proxiedConn) run(legacy netconn.Conn, stream channels.Stream) {
	pc.mu.Lock()
	if pc.killed {
		pc.mu.Unlock()
		resetLegacy(legacy)
		_ = stream.Reset()
		return
	}
	pc.legacy, pc.stream = legacy, stream
	pc.mu.Unlock()
	pc.relaying = true
	if d := pc.cs.cfg.IdleTimeout; d > 0 {
		// A timer, not a goroutine, per connection: it costs little while
		// thousands of connections sit idle.
		pc.mu.Lock()
		pc.idle = time.AfterFunc(d, pc.checkIdle)
		pc.mu.Unlock()
	}
	go func() {
		defer pc.finish()
		defer pc.stopIdle()
		r := relay(legacy, stream, relayStats{&pc.cs.stats.bytesOut, &pc.cs.stats.bytesIn, &pc.bytes, &pc.sends})
		if r.err() != nil {
			pc.cs.stats.reset.Add(1)
		}
		// Both directions, each with the first thing that ended it: which
		// side stopped first is what tells a truncation from a reset.
		if !pc.p.log.Enabled(context.Background(), slog.LevelDebug) {
			return
		}
		pc.p.log.Debug("connection ended", "channel", pc.cs.name,
			"legacy_local", legacy.LocalAddr(), "legacy_remote", legacy.RemoteAddr(),
			"up_bytes", r.up.n, "up", r.up.outcome(), "down_bytes", r.down.n, "down", r.down.outcome())
	}()
}

// checkIdle runs when the idle timer fires: a connection that moved no
// byte since the last check is reset, any other is checked again later.
func (pc *proxiedConn) checkIdle() {
	pc.mu.Lock()
	if pc.idle == nil {
		pc.mu.Unlock()
		return // the splice ended
	}
	now := pc.bytes.Load()
	if now != pc.lastBytes {
		pc.lastBytes = now
		pc.idle.Reset(pc.cs.cfg.IdleTimeout)
		pc.mu.Unlock()
		return
	}
	pc.mu.Unlock()
	pc.cs.stats.idle.Add(1)
	pc.p.log.Info("connection idle; resetting", "channel", pc.cs.name, "idleTimeout", pc.cs.cfg.IdleTimeout)
	pc.kill()
}

func (pc *proxiedConn) stopIdle() {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.idle != nil {
		pc.idle.Stop()
		pc.idle = nil
	}
}

// kill resets the connection in both directions.
func (pc *proxiedConn) kill() {
	pc.mu.Lock()
	pc.killed = true
	l, s := pc.legacy, pc.stream
	pc.mu.Unlock()
	if l != nil {
		resetLegacy(l)
		_ = s.Reset()
	}
}

// Shutdown stops the proxy: it closes every listener (a Change with
// Listening false for each request channel), stops taking streams from the
// mesh, waits for open connections to finish until ctx ends, resets those
// still open, waits for every goroutine it started and sends Closed. It
// returns ctx's error if connections had to be reset. It closes the
// network and the mesh if New made them; those given in Config belong to
// the caller, who closes them after Shutdown.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	switch p.state {
	case stateNew:
		p.state = stateClosed
		close(p.shutdown)
		p.mu.Unlock()
		err := p.closeOwned()
		if err != nil {
			p.emit(Error{Err: err})
		}
		p.emit(Closed{})
		p.flushEvents(ctx)
		return err
	case stateClosing, stateClosed:
		p.mu.Unlock()
		select {
		case <-p.shutdown:
			p.flushEvents(ctx)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.state = stateClosing
	p.mu.Unlock()

	p.cancel()
	for _, cs := range p.chans {
		if cs.reqLn != nil {
			_ = cs.reqLn.Close()
			p.emit(Change{Channel: cs.name, Kind: KindRequest, Listening: false, IP: cs.reqAddr.Addr(), Port: cs.reqAddr.Port()})
		}
		p.closeImpostors(cs)
	}
	p.loops.Wait()

	drained := make(chan struct{})
	go func() {
		p.connWG.Wait()
		close(drained)
	}()
	var err error
	select {
	case <-drained:
	case <-ctx.Done():
		p.mu.Lock()
		n := len(p.conns)
		for pc := range p.conns {
			pc.kill()
		}
		p.mu.Unlock()
		err = fmt.Errorf("shutdown: reset %d connections still open: %w", n, ctx.Err())
		p.log.Warn("drain deadline passed", "reset", n)
		<-drained
	}
	p.workers.Wait() // idle since the connections drained; ctx has ended
	if cerr := p.closeOwned(); cerr != nil {
		p.emit(Error{Err: cerr})
		err = errors.Join(err, cerr)
	}

	p.mu.Lock()
	p.state = stateClosed
	p.mu.Unlock()
	close(p.shutdown)
	p.log.Info("proxy closed")
	p.emit(Closed{})
	p.flushEvents(ctx)
	return err
}

// eventGrace is how long undelivered events wait for a reader after
// Shutdown's context has ended.
const eventGrace = time.Second

// flushEvents waits until every event, Closed included, has been taken
// from Events, or ctx has ended and eventGrace passed; then undelivered
// events are dropped so that no goroutine outlives the proxy.
func (p *Proxy) flushEvents(ctx context.Context) {
	select {
	case <-p.events.done:
		return
	case <-ctx.Done():
	}
	t := time.NewTimer(eventGrace)
	defer t.Stop()
	select {
	case <-p.events.done:
	case <-t.C:
		p.events.abandon()
	}
}

// channelCounters are live per-channel statistics.
type channelCounters struct {
	total    atomic.Int64 // connections or streams taken
	active   atomic.Int64
	failed   atomic.Int64 // could not be connected end to end
	refused  atomic.Int64 // turned away at the connection limit
	idle     atomic.Int64 // reset by the idle timeout
	reset    atomic.Int64 // ended with an error (reset either side)
	bytesOut atomic.Int64 // legacy → stream
	bytesIn  atomic.Int64 // stream → legacy
}

// ChannelStats is a snapshot of one channel's counters.
type ChannelStats struct {
	Channel     string
	Kind        Kind
	Connections int64 // total proxied connections (both directions of setup)
	Active      int64
	Failed      int64 // could not be connected: no member, legacy server down, ...
	Refused     int64 // turned away at the channel's connection limit
	IdleReset   int64 // reset by the channel's idle timeout
	Reset       int64 // ended by a reset or transport failure
	BytesOut    int64 // from the legacy program into the mesh
	BytesIn     int64 // from the mesh to the legacy program
	Members     int   // duplex: members known, the local instance included
}

// Stats returns a snapshot of every channel's counters, sorted by name.
func (p *Proxy) Stats() []ChannelStats {
	out := make([]ChannelStats, 0, len(p.chans))
	for _, cs := range p.chans {
		cs.mu.Lock()
		members := len(cs.members)
		cs.mu.Unlock()
		out = append(out, ChannelStats{
			Members:     members,
			Channel:     cs.name,
			Kind:        cs.cfg.Kind,
			Connections: cs.stats.total.Load(),
			Active:      cs.stats.active.Load(),
			Failed:      cs.stats.failed.Load(),
			Refused:     cs.stats.refused.Load(),
			IdleReset:   cs.stats.idle.Load(),
			Reset:       cs.stats.reset.Load(),
			BytesOut:    cs.stats.bytesOut.Load(),
			BytesIn:     cs.stats.bytesIn.Load(),
		})
	}
	return out
}
