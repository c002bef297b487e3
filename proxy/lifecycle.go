package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one proxied connection, tracked so that Shutdown can drain it
// and, past its deadline, reset it.
type conn struct {
	p  *Proxy
	cs *channelState

	mu     sync.Mutex
	legacy net.Conn
	stream net.Conn
	killed bool

	// spliced is set by run, in the goroutine track started, when the
	// splice goroutine took over finishing the conn.
	spliced bool

	// bytes counts the connection's traffic both ways; the idle timer
	// compares it with lastBytes each time it fires.
	bytes     atomic.Int64
	lastBytes int64
	idle      *time.Timer
}

// track runs f in a new goroutine owned by the proxy, with a conn that
// Shutdown can abort. Once Shutdown has begun, or when the channel is at
// its connection limit, it runs refuse instead, in the caller's goroutine.
func (p *Proxy) track(cs *channelState, f func(*conn), refuse func()) {
	if n := cs.stats.active.Add(1); n > cs.cfg.maxConnections() {
		cs.stats.active.Add(-1)
		cs.stats.refused.Add(1)
		p.log.Warn("channel at its connection limit; refusing", "channel", cs.name, "limit", cs.cfg.maxConnections())
		refuse()
		return
	}
	k := &conn{p: p, cs: cs}
	p.mu.Lock()
	if p.state != stateRunning {
		p.mu.Unlock()
		cs.stats.active.Add(-1)
		refuse()
		return
	}
	p.conns[k] = struct{}{}
	p.connWG.Add(1)
	p.mu.Unlock()
	cs.stats.total.Add(1)
	go func() {
		defer func() {
			if !k.spliced {
				k.finish()
			}
		}()
		f(k)
	}()
}

// finish releases a tracked conn once it is over.
func (k *conn) finish() {
	k.cs.stats.active.Add(-1)
	k.p.mu.Lock()
	delete(k.p.conns, k)
	k.p.mu.Unlock()
	k.p.connWG.Done()
}

// run splices legacy and stream unless the conn was killed meanwhile. The
// splice runs in a new goroutine, which finishes the conn, and the caller's
// goroutine ends: its stack grew while dialing or opening the stream, and a
// fresh one is half the size for the connection's life (see
// BenchmarkRequestReplyIdle).
func (k *conn) run(legacy halfConn, stream halfConn) {
	k.mu.Lock()
	if k.killed {
		k.mu.Unlock()
		abort(legacy)
		abort(stream)
		return
	}
	k.legacy, k.stream = legacy, stream
	k.mu.Unlock()
	k.spliced = true
	if d := k.cs.cfg.IdleTimeout; d > 0 {
		// A timer, not a goroutine, per connection: it costs little while
		// thousands of connections sit idle.
		k.mu.Lock()
		k.idle = time.AfterFunc(d, k.checkIdle)
		k.mu.Unlock()
	}
	go func() {
		defer k.finish()
		defer k.stopIdle()
		r := splice(legacy, stream, spliceStats{&k.cs.stats.bytesOut, &k.cs.stats.bytesIn, &k.bytes})
		if r.err() != nil {
			k.cs.stats.reset.Add(1)
		}
		// Both directions, each with the first thing that ended it: which
		// side stopped first is what tells a truncation from a reset.
		if !k.p.log.Enabled(context.Background(), slog.LevelDebug) {
			return
		}
		k.p.log.Debug("connection ended", "channel", k.cs.name,
			"legacy_local", legacy.LocalAddr(), "legacy_remote", legacy.RemoteAddr(),
			"up_bytes", r.up.n, "up", r.up.outcome(), "down_bytes", r.down.n, "down", r.down.outcome())
	}()
}

// checkIdle runs when the idle timer fires: a connection that moved no
// byte since the last check is reset, any other is checked again later.
func (k *conn) checkIdle() {
	k.mu.Lock()
	if k.idle == nil {
		k.mu.Unlock()
		return // the splice ended
	}
	now := k.bytes.Load()
	if now != k.lastBytes {
		k.lastBytes = now
		k.idle.Reset(k.cs.cfg.IdleTimeout)
		k.mu.Unlock()
		return
	}
	k.mu.Unlock()
	k.cs.stats.idle.Add(1)
	k.p.log.Info("connection idle; resetting", "channel", k.cs.name, "idleTimeout", k.cs.cfg.IdleTimeout)
	k.kill()
}

func (k *conn) stopIdle() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.idle != nil {
		k.idle.Stop()
		k.idle = nil
	}
}

// kill resets the connection in both directions.
func (k *conn) kill() {
	k.mu.Lock()
	k.killed = true
	l, s := k.legacy, k.stream
	k.mu.Unlock()
	if l != nil {
		abort(l)
		abort(s)
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
		for k := range p.conns {
			k.kill()
		}
		p.mu.Unlock()
		err = fmt.Errorf("shutdown: reset %d connections still open: %w", n, ctx.Err())
		p.log.Warn("drain deadline passed", "reset", n)
		<-drained
	}
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
