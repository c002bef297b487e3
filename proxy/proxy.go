// Package proxy is tcpproxy's core: the Go form of @kumori/tcp-proxy's
// TcpProxy(iid, role, channels).
//
// A Proxy gives the legacy program synthetic addresses on a Network and
// carries every TCP connection made to or from them as a stream over a Mesh:
//
//	request          legacy client → requestIP:port → stream to a reply instance
//	reply            stream → legacy server at bindIP:port
//	duplex bind      stream from a member → legacy server at bindIP:port,
//	                 from the caller's instance IP
//	duplex connect   legacy client → memberIP:port ("impostor") → stream to
//	                 that member
//
// Its lifecycle is New, Start, then Shutdown; Events delivers Ready, Change,
// Synced, Error and finally Closed, in order.
//
// # Typical usage
//
// One instance, serving a Redis on its reply channel "cache" and calling a
// database through its request channel "db", with the members listed in a
// watched file and mutual TLS between proxies:
//
//	tlsFiles, err := creds.WatchFiles(creds.FilesConfig{ // reloaded when they change
//		Cert: "cache-1.pem", Key: "cache-1-key.pem", CA: "ca.pem",
//	})
//	...
//	defer tlsFiles.Close()
//	p, err := proxy.New(proxy.Config{
//		IID:  "cache-1",
//		Role: "cache",
//		Channels: map[string]proxy.ChannelConfig{
//			"cache": {Kind: proxy.KindReply, Port: 6379},
//			"db":    {Kind: proxy.KindRequest, Port: 5432},
//		},
//		Node: channels.Config{
//			ListenAddr: "0.0.0.0:7000",
//			Members:    membership.File("/etc/tcpproxy/members.yaml", 0),
//			TLS:        tlsFiles,
//		},
//	})
//	...
//	if err := p.Start(ctx); err != nil { ... }
//	for e := range p.Events() {
//		switch e := e.(type) {
//		case proxy.Ready:   // start redis-server --bind e.BindIP --port 6379
//		case proxy.Change:  // request channel "db": connect to e.IP:e.Port
//		case proxy.Synced:  // the initial state is complete
//		case proxy.Error:   // log it
//		}
//	}
//
// and, to stop, p.Shutdown(ctx), which drains the connections and closes
// the network and the node the proxy made; Events ends with Closed. The
// lower-level pieces (a channels.Node given as Mesh, a netstack.Network
// given as Network) stay available for those who build them themselves.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/proxy/netconn"

	"github.com/tcpproxy/tcpproxy/internal/defaults"
)

// Proxy is one instance's proxy. Create it with New.
type Proxy struct {
	cfg    Config
	log    *slog.Logger
	alloc  *InstanceAllocator
	bindIP netip.Addr
	chans  []*channelState // sorted by name
	events *eventQueue

	// ctx ends the accept loops and watchers; connections have their own
	// lifetime so that Shutdown can drain them.
	ctx    context.Context
	cancel context.CancelFunc
	loops  sync.WaitGroup

	// ownNetwork and ownNode are what New made because Config left them
	// out: the proxy starts and closes them.
	ownNetwork bool
	ownNode    *channels.Node

	mu       sync.Mutex
	state    int // stateNew, stateRunning, stateClosing, stateClosed
	conns    map[*proxiedConn]struct{}
	connWG   sync.WaitGroup
	shutdown chan struct{} // closed when Shutdown has finished

	// setups hands a connection's setup to an idle setup worker, and
	// workers counts the workers (see runSetup).
	setups  chan func()
	workers sync.WaitGroup
}

const (
	stateNew = iota
	stateRunning
	stateClosing
	stateClosed
)

// channelState is one configured channel at run time.
type channelState struct {
	name  string
	cfg   ChannelConfig
	stats channelCounters
	// failLog and limitLog hold back repeats of the warnings about
	// connections that failed and that the limit refused.
	failLog, limitLog rateLog

	request channels.RequestChannel
	reply   channels.ReplyChannel
	duplex  channels.DuplexChannel

	// request: the listener on requestIP:port.
	reqAddr netip.AddrPort
	reqLn   netconn.Listener

	// duplex connect: one impostor listener per remote member.
	mu        sync.Mutex
	impostors map[string]*impostor
	members   []MemberAddr // last membership published in a Change
}

type impostor struct {
	addr netip.AddrPort
	ln   netconn.Listener
}

// New validates cfg, assigns addresses and registers every channel with
// the mesh. When cfg gives no Network or no Mesh, New makes them (host
// sockets, a channels.Node configured by cfg.Node) and the proxy owns
// them. A Mesh given in cfg is the caller's to start, after New and
// before or after Start: streams arriving before Start wait in the mesh.
func New(cfg Config) (_ *Proxy, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Addressing = cfg.Addressing.WithDefaults()
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = defaults.DialTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	p := &Proxy{
		cfg:      cfg,
		log:      cfg.Logger.With("iid", cfg.IID),
		alloc:    NewInstanceAllocator(cfg.Addressing.InstanceRange),
		conns:    make(map[*proxiedConn]struct{}),
		shutdown: make(chan struct{}),
		setups:   make(chan func()),
	}
	if p.bindIP, err = p.alloc.Add(cfg.IID); err != nil {
		return nil, fmt.Errorf("bind address: %w", err)
	}
	if p.cfg.Network == nil {
		p.cfg.Network, p.ownNetwork = NewLoopback(), true
	}
	if p.cfg.Mesh == nil {
		nc := cfg.Node
		nc.IID, nc.Role = cfg.IID, cfg.Role
		if nc.Logger == nil {
			nc.Logger = cfg.Logger
		}
		if p.ownNode, err = channels.NewNode(nc); err != nil {
			p.closeOwned()
			return nil, err
		}
		p.cfg.Mesh = p.ownNode
	}
	defer func() {
		if err != nil {
			p.closeOwned()
		}
	}()
	cfg = p.cfg
	var reqNames []string
	for name, cc := range cfg.Channels {
		if cc.Kind == KindRequest {
			reqNames = append(reqNames, name)
		}
	}
	reqIPs, err := RequestIPs(cfg.Addressing.RequestRange, reqNames)
	if err != nil {
		return nil, err
	}
	for name, cc := range cfg.Channels {
		cs := &channelState{name: name, cfg: cc, impostors: make(map[string]*impostor)}
		switch cc.Kind {
		case KindRequest:
			target := cc.Target
			if target == "" {
				target = name
			}
			cs.reqAddr = netip.AddrPortFrom(reqIPs[name], uint16(cc.Port))
			cs.request, err = cfg.Mesh.Request(name, target, cc.balancer())
		case KindReply:
			cs.reply, err = cfg.Mesh.Reply(name)
		case KindDuplex:
			cs.duplex, err = cfg.Mesh.Duplex(name)
		}
		if err != nil {
			return nil, fmt.Errorf("register channel %s: %w", name, err)
		}
		p.chans = append(p.chans, cs)
	}
	slices.SortFunc(p.chans, func(a, b *channelState) int { return cmpString(a.name, b.name) })
	return p, nil
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// IID is the instance id.
func (p *Proxy) IID() string { return p.cfg.IID }

// Self is this instance's membership entry (see Config.Member), with
// Config.Advertise as its address, or else the address the mesh listens
// on; that is known once Start has started a mesh the proxy owns.
func (p *Proxy) Self() channels.Member {
	addr := p.cfg.Advertise
	if addr == "" {
		addr = p.cfg.Mesh.Addr()
	}
	return p.cfg.Member(addr)
}

// closeOwned closes the node and the network that New made.
func (p *Proxy) closeOwned() error {
	var errs []error
	if p.ownNode != nil {
		if err := p.ownNode.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close node: %w", err))
		}
	}
	if p.ownNetwork {
		if err := p.cfg.Network.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close network: %w", err))
		}
	}
	return errors.Join(errs...)
}

// BindIP is the instance's own IP, where legacy servers bind.
func (p *Proxy) BindIP() netip.Addr { return p.bindIP }

// RequestAddr is where the legacy client reaches request channel name.
func (p *Proxy) RequestAddr(name string) (netip.AddrPort, bool) {
	for _, cs := range p.chans {
		if cs.name == name && cs.cfg.Kind == KindRequest {
			return cs.reqAddr, true
		}
	}
	return netip.AddrPort{}, false
}

// InstanceIP returns the address the legacy program sees for iid,
// assigning one if iid is new.
func (p *Proxy) InstanceIP(iid string) (netip.Addr, error) { return p.alloc.Add(iid) }

// Events delivers Ready, Change, Error and Closed in order; it is closed
// after Closed. Read it until it is closed: undelivered events are dropped
// only when Shutdown's context ends first.
func (p *Proxy) Events() <-chan Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.events == nil {
		p.events = newEventQueue()
	}
	return p.events.out
}

func (p *Proxy) emit(e Event) {
	p.Events() // make sure the queue exists
	if ev, ok := e.(Error); ok {
		p.log.Error("proxy error", "channel", ev.Channel, "err", ev.Err)
	}
	p.events.push(e)
}

// Start starts the mesh if the proxy owns it (which waits for the first
// member list), opens every request listener and the first set of duplex
// impostors, sends Ready, a Change per request and duplex channel and
// Synced, and starts serving. ctx bounds only the start itself; the proxy
// runs until Shutdown. If the mesh or a listener cannot be started, Start
// releases everything it opened, sends the error as an Error event
// followed by Closed, and returns it; Shutdown is then only needed to
// release Events' goroutine when nobody reads Events.
func (p *Proxy) Start(ctx context.Context) error {
	p.mu.Lock()
	if p.state != stateNew {
		p.mu.Unlock()
		return errors.New("proxy: Start called twice or after Shutdown")
	}
	p.state = stateRunning
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.mu.Unlock()

	if p.ownNode != nil {
		if err := p.ownNode.Start(ctx); err != nil {
			err = fmt.Errorf("start mesh: %w", err)
			p.emit(Error{Err: err})
			p.abortStart()
			return err
		}
	}

	for _, cs := range p.chans {
		if cs.cfg.Kind != KindRequest {
			continue
		}
		ln, err := p.cfg.Network.Listen(ctx, cs.reqAddr)
		if err != nil {
			err = fmt.Errorf("listen on request address %s: %w", cs.reqAddr, err)
			p.emit(Error{Channel: cs.name, Err: err})
			p.abortStart()
			return fmt.Errorf("channel %s: %w", cs.name, err)
		}
		cs.reqLn = ln
	}
	// Duplex members are known at once (Watch sends the current list
	// first), so impostors exist before Ready and a legacy client started
	// on Ready finds them.
	firstMembers := make(map[*channelState][]channels.Member)
	watches := make(map[*channelState]<-chan []channels.Member)
	for _, cs := range p.chans {
		if cs.cfg.Kind != KindDuplex {
			continue
		}
		ch := cs.duplex.Watch(p.ctx)
		watches[cs] = ch
		select {
		case ms, ok := <-ch:
			if ok {
				firstMembers[cs] = ms
			}
		case <-ctx.Done():
			p.abortStart()
			return fmt.Errorf("channel %s: waiting for membership: %w", cs.name, ctx.Err())
		}
	}
	var changes []Change
	for _, cs := range p.chans {
		if cs.cfg.Kind == KindDuplex {
			changes = append(changes, p.applyMembers(cs, firstMembers[cs]))
		}
	}

	p.emit(Ready{BindIP: p.bindIP})
	for _, cs := range p.chans {
		switch cs.cfg.Kind {
		case KindRequest:
			p.emit(Change{Channel: cs.name, Kind: KindRequest, Listening: true, IP: cs.reqAddr.Addr(), Port: cs.reqAddr.Port()})
			p.log.Info("request channel listening", "channel", cs.name, "addr", cs.reqAddr)
			p.serveListener(cs, cs.reqLn, p.requestTarget(cs))
		case KindReply:
			p.goLoop(func() { p.acceptStreams(cs, cs.reply.Accept) })
		case KindDuplex:
			// Connect-only channels accept too, to refuse streams at once
			// instead of leaving them queued in the mesh.
			p.goLoop(func() { p.acceptStreams(cs, cs.duplex.Accept) })
			w := watches[cs]
			p.goLoop(func() { p.watchMembers(cs, w) })
		}
	}
	p.goLoop(p.watchStalledSends)
	if n, ok := p.cfg.Network.(FailingNetwork); ok {
		p.goLoop(func() { p.watchNetwork(n) })
	}
	for _, c := range changes {
		p.emit(c)
	}
	p.emit(Synced{})
	p.log.Info("proxy ready", "bindIP", p.bindIP, "role", p.cfg.Role)
	return nil
}

// abortStart undoes a failed Start.
func (p *Proxy) abortStart() {
	p.cancel()
	for _, cs := range p.chans {
		if cs.reqLn != nil {
			_ = cs.reqLn.Close()
		}
		p.closeImpostors(cs)
	}
	p.loops.Wait()
	if err := p.closeOwned(); err != nil {
		p.emit(Error{Err: err})
	}
	p.mu.Lock()
	p.state = stateClosed
	p.mu.Unlock()
	close(p.shutdown)
	p.emit(Closed{})
}

func (p *Proxy) goLoop(f func()) {
	p.loops.Add(1)
	go func() {
		defer p.loops.Done()
		f()
	}()
}

// opener opens the stream for a connection accepted on a listener.
type opener func(ctx context.Context, h channels.Header) (channels.Stream, string, error)

func (p *Proxy) requestTarget(cs *channelState) opener {
	return func(ctx context.Context, h channels.Header) (channels.Stream, string, error) {
		s, m, err := cs.request.Open(ctx, h)
		return s, m.IID, err
	}
}

func (p *Proxy) duplexTarget(cs *channelState, iid string) opener {
	return func(ctx context.Context, h channels.Header) (channels.Stream, string, error) {
		s, err := cs.duplex.Open(ctx, iid, h)
		return s, iid, err
	}
}

// serveListener accepts legacy connections on ln until it is closed, and
// carries each one as a stream opened by open.
func (p *Proxy) serveListener(cs *channelState, ln netconn.Listener, open opener) {
	p.goLoop(func() {
		var delay time.Duration
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) || p.ctx.Err() != nil {
					return
				}
				// Out of file descriptors and the like: back off rather
				// than spin, keep serving the connections we have.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				p.log.Warn("accept failed", "channel", cs.name, "addr", ln.Addr(), "err", err, "retry_in", delay)
				select {
				case <-time.After(delay):
					continue
				case <-p.ctx.Done():
					return
				}
			}
			delay = 0
			p.track(cs, func(pc *proxiedConn) { p.forwardOutgoing(cs, pc, c, open) }, func() { resetLegacy(c) })
		}
	})
}

// forwardOutgoing carries a connection from the legacy client to a stream.
func (p *Proxy) forwardOutgoing(cs *channelState, pc *proxiedConn, legacy netconn.Conn, open opener) {
	armReset(legacy)
	local, remote := addrPort(legacy.LocalAddr()), addrPort(legacy.RemoteAddr())
	h := channels.Header{
		Channel:    cs.cfg.Target,
		SourceIID:  p.cfg.IID,
		SourcePort: remote.Port(),
		TargetPort: local.Port(),
	}
	if h.Channel == "" {
		h.Channel = cs.name
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	stream, peer, err := open(ctx, h)
	cancel()
	if err != nil {
		cs.stats.failed.Add(1)
		if ok, held := cs.failLog.allow(time.Now()); ok {
			p.log.Warn("open stream failed; resetting legacy connection", "channel", cs.name, "from", remote, "err", err, "suppressed", held)
		}
		resetLegacy(legacy)
		return
	}
	p.log.Debug("connection", "channel", cs.name, "from", remote, "to", peer)
	pc.run(legacy, stream)
}

// acceptStreams takes streams from the mesh until the proxy stops and
// connects each one to the legacy server at bindIP:port.
func (p *Proxy) acceptStreams(cs *channelState, accept func(context.Context) (channels.Incoming, error)) {
	dst := netip.AddrPortFrom(p.bindIP, uint16(cs.cfg.Port))
	for {
		in, err := accept(p.ctx)
		if err != nil {
			if p.ctx.Err() != nil || errors.Is(err, channels.ErrClosed) {
				return
			}
			p.emit(Error{Channel: cs.name, Err: fmt.Errorf("accept stream: %w", err)})
			return
		}
		p.track(cs, func(pc *proxiedConn) { p.forwardIncoming(cs, pc, in, dst) }, func() { _ = in.Stream.Reset() })
	}
}

// forwardIncoming carries a stream from a peer to the legacy server,
// connecting from the caller's instance IP so the server sees who calls.
func (p *Proxy) forwardIncoming(cs *channelState, pc *proxiedConn, in channels.Incoming, dst netip.AddrPort) {
	if cs.cfg.Kind == KindDuplex && !cs.cfg.binds() {
		cs.stats.failed.Add(1)
		if ok, held := cs.failLog.allow(time.Now()); ok {
			p.log.Warn("stream to a connect-only duplex channel; resetting", "channel", cs.name, "caller", in.Header.SourceIID, "suppressed", held)
		}
		_ = in.Stream.Reset()
		return
	}
	src, err := p.alloc.Add(in.Header.SourceIID)
	if err != nil {
		cs.stats.failed.Add(1)
		if ok, held := cs.failLog.allow(time.Now()); ok {
			p.log.Warn("no address for caller; resetting stream", "channel", cs.name, "caller", in.Header.SourceIID, "err", err, "suppressed", held)
		}
		_ = in.Stream.Reset()
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	c, err := p.cfg.Network.Dial(ctx, src, dst)
	cancel()
	if err != nil {
		cs.stats.failed.Add(1)
		if ok, held := cs.failLog.allow(time.Now()); ok {
			p.log.Warn("connect to legacy server failed; resetting stream", "channel", cs.name, "caller", in.Header.SourceIID, "dst", dst, "err", err, "suppressed", held)
		}
		_ = in.Stream.Reset()
		return
	}
	armReset(c)
	p.log.Debug("connection", "channel", cs.name, "caller", in.Header.SourceIID, "from", src, "to", dst)
	pc.run(c, in.Stream)
}

// addrPort returns a's address and port, without formatting and parsing a
// string when it is a *net.TCPAddr (as for every Network here).
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
