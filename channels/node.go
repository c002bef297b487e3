package channels

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/mux"
	"github.com/tcpproxy/tcpproxy/channels/wire"
)

// Node is one proxy's endpoint in the mesh. Register its channels with
// Request, Reply and Duplex, then Start it; Close releases everything.
//
// Sessions to other nodes are dialed lazily, on the first Open to a member,
// and reused for every later stream in either direction.
type Node struct {
	cfg      Config
	log      *slog.Logger
	tls      *tlsState // nil without TLS
	refusals *refusalLog
	sessions *sessionLog // lines of sessions up and closed
	// admission bounds the handshakes in progress on accepted
	// connections.
	admission *admission
	// memberGrace is memberGrace when the node was made.
	memberGrace time.Duration

	// ctx lives from NewNode to Close and bounds every goroutine the node
	// owns (dials, handshakes, the membership watch).
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	done   chan struct{} // closed by Close

	// Set by Start, then read-only.
	ln    net.Listener
	hello wire.Hello

	// Registered before Start, then read-only: the accept queues of reply
	// and duplex channels by name, and every channel name in use.
	queues map[string]chan Incoming
	names  map[string]bool

	// congestionWarn says once that Config.CongestionControl could not
	// be set.
	congestionWarn sync.Once

	mu sync.Mutex
	// ended sums the limit counters of the sessions removed from peers
	// (Limits).
	ended   mux.LimitStats
	started bool
	closed  bool
	peers   map[string]*peer
	members memberState
	// sessionsChanged is closed, and replaced, when a session comes up
	// (for a session the peer dialed: once the peer answered on it) or
	// ends: Opens waiting for a session look again at once.
	sessionsChanged chan struct{}
	requests        []*requestChannel
	duplexes        []*duplexChannel
}

// NewNode validates cfg and returns a node that is not yet started.
func NewNode(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.With("iid", cfg.IID)
	if lt, ok := cfg.Transport.(loggingTransport); ok {
		cfg.Transport = lt.withLogger(log)
	}
	if cfg.TLS != nil {
		// The TLS data path: see tlsconn.go (and sessionConn in newSession).
		cfg.Transport = tlsTransport{cfg.Transport}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Node{
		cfg:             cfg,
		log:             log,
		tls:             newTLSState(cfg.TLS),
		refusals:        newRefusalLog(log),
		sessions:        newSessionLog(log),
		admission:       newAdmission(cfg.MaxHandshakes, cfg.MaxHandshakesPerIP),
		memberGrace:     memberGrace,
		ctx:             ctx,
		cancel:          cancel,
		done:            make(chan struct{}),
		queues:          make(map[string]chan Incoming),
		names:           make(map[string]bool),
		peers:           make(map[string]*peer),
		sessionsChanged: make(chan struct{}),
	}, nil
}

// Request registers the client side of a load-balanced channel. Streams go
// to the members that serve target (the reply channel's name on them;
// empty means name), chosen by b (nil means RoundRobin). Register channels
// before Start.
func (n *Node) Request(name, target string, b Balancer) (RequestChannel, error) {
	if target == "" {
		target = name
	}
	if err := checkChannelName("target", target); err != nil {
		return nil, fmt.Errorf("request channel %q: %w", name, err)
	}
	if b == nil {
		b = RoundRobin()
	}
	r := &requestChannel{n: n, name: name, target: target, balancer: b, active: make(map[string]int)}
	if err := n.register("request", name, func() { n.requests = append(n.requests, r) }); err != nil {
		return nil, err
	}
	return r, nil
}

// Reply registers the server side of a load-balanced channel. Register
// channels before Start.
func (n *Node) Reply(name string) (ReplyChannel, error) {
	q := make(chan Incoming, n.cfg.AcceptBacklog)
	if err := n.register("reply", name, func() { n.queues[name] = q }); err != nil {
		return nil, err
	}
	return &replyChannel{n: n, name: name, queue: q}, nil
}

// Duplex registers a symmetric channel. Register channels before Start.
func (n *Node) Duplex(name string) (DuplexChannel, error) {
	d := &duplexChannel{n: n, name: name, queue: make(chan Incoming, n.cfg.AcceptBacklog), watchers: make(map[*watcher]struct{})}
	if err := n.register("duplex", name, func() {
		n.queues[name] = d.queue
		n.duplexes = append(n.duplexes, d)
	}); err != nil {
		return nil, err
	}
	return d, nil
}

func (n *Node) register(kind, name string, add func()) error {
	if err := checkChannelName("name", name); err != nil {
		return fmt.Errorf("%s channel %q: %w", kind, name, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.closed:
		return fmt.Errorf("%s channel %q: %w", kind, name, ErrClosed)
	case n.started:
		return fmt.Errorf("%s channel %q: register channels before Start", kind, name)
	case n.names[name]:
		return fmt.Errorf("%s channel %q: name already registered on this node", kind, name)
	case kind != "request" && len(n.queues) >= wire.MaxChannels:
		return fmt.Errorf("%s channel %q: more than %d served channels", kind, name, wire.MaxChannels)
	}
	n.names[name] = true
	add()
	return nil
}

func checkChannelName(what, name string) error {
	if name == "" {
		return fmt.Errorf("channel %s is empty", what)
	}
	if name == retireChannel {
		return fmt.Errorf("channel %s %q is reserved", what, name)
	}
	if len(name) > wire.MaxNameLen {
		return fmt.Errorf("channel %s length %d exceeds %d", what, len(name), wire.MaxNameLen)
	}
	return nil
}

// Start listens (unless Config.ListenAddr is empty) and starts watching
// membership. It returns once the node listens and has the first member
// list; ctx bounds only that wait, the node runs until Close. When Start
// fails, the node is closed.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	switch {
	case n.closed:
		n.mu.Unlock()
		return ErrClosed
	case n.started:
		n.mu.Unlock()
		return errors.New("node already started")
	}
	n.started = true
	served := make([]string, 0, len(n.queues))
	for name := range n.queues {
		served = append(served, name)
	}
	slices.Sort(served)
	n.hello = wire.Hello{IID: n.cfg.IID, Role: n.cfg.Role, Channels: served}
	n.mu.Unlock()

	if err := n.start(ctx); err != nil {
		n.Close()
		return fmt.Errorf("start node %s: %w", n.cfg.IID, err)
	}
	return nil
}

func (n *Node) start(ctx context.Context) error {
	if n.plaintextAnywhere() {
		n.log.Warn("insecure: sessions without TLS with peers at any address; " +
			"anyone who can reach this node or its peers can read and alter them")
	}
	if !n.spawn(func() { n.refusals.run(n.done, n.sessions) }) {
		return ErrClosed
	}
	if n.cfg.ListenAddr != "" {
		ln, err := n.cfg.Transport.Listen(n.cfg.ListenAddr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", n.cfg.ListenAddr, err)
		}
		n.mu.Lock()
		n.ln = ln
		n.mu.Unlock()
		if !n.spawn(func() { n.acceptLoop(ln) }) {
			return ErrClosed
		}
		n.log.Info("listening", "addr", ln.Addr().String())
	}
	if n.cfg.Members == nil {
		n.setMembers(nil)
		return nil
	}
	updates, err := n.cfg.Members.Watch(n.ctx)
	if err != nil {
		return fmt.Errorf("watch members: %w", err)
	}
	select {
	case list, ok := <-updates:
		if !ok {
			return errors.New("watch members: source closed before sending a member list")
		}
		n.setMembers(list)
	case <-ctx.Done():
		return fmt.Errorf("wait for the first member list: %w", ctx.Err())
	case <-n.done:
		return ErrClosed
	}
	if !n.spawn(func() { n.watchMembers(updates) }) {
		return ErrClosed
	}
	return nil
}

// spawn runs f in a goroutine that Close waits for, unless the node is
// closed. Adding to the WaitGroup under the lock that Close takes before it
// waits keeps every Add ahead of the Wait.
func (n *Node) spawn(f func()) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Go(f)
	return true
}

// watchMembers applies membership updates until the source or node ends.
func (n *Node) watchMembers(updates <-chan []Member) {
	for {
		select {
		case list, ok := <-updates:
			if !ok {
				if n.ctx.Err() == nil {
					n.log.Warn("membership source stopped; keeping the last member list")
				}
				return
			}
			n.setMembers(list)
		case <-n.ctx.Done():
			return
		}
	}
}

// acceptLoop hands every incoming connection to its own goroutine, so a
// slow handshake never holds up the next peer, within the bounds of
// n.admission: a connection beyond them is closed at once.
func (n *Node) acceptLoop(ln net.Listener) {
	var (
		delay  time.Duration
		failed int       // accept errors since the last logged
		logged time.Time // when the last was logged
	)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if n.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait and retry
			// rather than spin or give up listening, and say so at most
			// once per acceptLogInterval.
			delay = min(max(2*delay, acceptRetryMin), acceptRetryMax)
			if failed++; time.Since(logged) >= acceptLogInterval {
				n.log.Warn("accept failed; retrying", "err", err, "failures", failed, "retry_in", delay)
				failed, logged = 0, time.Now()
			}
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-n.ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		delay = 0
		if err := n.admission.acquire(conn.RemoteAddr()); err != nil {
			n.overload(conn, err)
			continue
		}
		if !n.spawn(func() { n.serveConn(conn) }) {
			n.admission.release(conn.RemoteAddr())
			conn.Close()
			return
		}
	}
}

// How acceptLoop waits after a failed accept, and how often it logs
// failures (variables for tests).
var (
	acceptRetryMin    = 5 * time.Millisecond
	acceptRetryMax    = 100 * time.Millisecond
	acceptLogInterval = 10 * time.Second
)

// overload closes conn, which came beyond the bounds of n.admission, and
// reports it refused.
func (n *Node) overload(conn net.Conn, err error) {
	if tc, ok := conn.(*net.TCPConn); ok {
		// A reset rather than a FIN: no socket lingers in TIME_WAIT
		// for each connection of a flood.
		_ = tc.SetLinger(0)
	}
	conn.Close()
	n.refuse(conn.RemoteAddr(), Refusal{Reason: RefusedOverload,
		Err: fmt.Errorf("connection from %s closed at once: %w", conn.RemoteAddr(), err)})
}

// IID is the node's instance id.
func (n *Node) IID() string { return n.cfg.IID }

// Role is the node's role.
func (n *Node) Role() string { return n.cfg.Role }

// Addr returns the address the node listens on, or "" when it does not.
func (n *Node) Addr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ln == nil {
		return ""
	}
	return n.ln.Addr().String()
}

// Close closes the listener and every session, waits for all the node's
// goroutines to end, and resets streams that were never accepted. Streams
// already handed out end with an error. Channel operations then return
// ErrClosed. Close is idempotent.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	close(n.done)
	ln := n.ln
	var sessions []*session
	for _, p := range n.peers {
		sessions = append(sessions, p.sessions...)
	}
	for _, d := range n.duplexes {
		d.closeWatchers()
	}
	n.mu.Unlock()

	n.cancel()
	var err error
	if ln != nil {
		if cerr := ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = fmt.Errorf("close listener: %w", cerr)
		}
	}
	// Together: each waits, over TCP, for its peer to take its GoAway
	// (mux.Session.Close), which would add up one after the other.
	var closing sync.WaitGroup
	for _, s := range sessions {
		closing.Go(func() { s.ys.Close() })
	}
	closing.Wait()
	n.wg.Wait()
	for _, q := range n.queues {
		drain(q)
	}
	n.log.Debug("node closed")
	return err
}

func drain(q chan Incoming) {
	for {
		select {
		case inc := <-q:
			inc.Stream.Reset()
		default:
			return
		}
	}
}
