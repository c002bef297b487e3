package membership

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	"github.com/tcpproxy/tcpproxy/channels"
)

// Etcd defaults.
const (
	DefaultEtcdTTL            = 10 * time.Second
	DefaultEtcdDialTimeout    = 5 * time.Second
	DefaultEtcdRequestTimeout = 5 * time.Second
)

// EtcdConfig configures an etcd v3 membership source.
type EtcdConfig struct {
	// Endpoints are etcd client URLs, e.g. "http://10.0.0.1:2379".
	Endpoints []string
	// Prefix is the key prefix of the mesh, e.g. "/tcpproxy/prod/members/".
	// Each member is the JSON of a channels.Member under Prefix+IID. A
	// missing trailing slash is added, so that "/m/a" never lists the keys
	// of "/m/ab/".
	Prefix string
	// TTL is the lease of the self registration (default 10s, rounded up
	// to whole seconds): how long a killed proxy stays listed. etcd raises
	// a TTL below its minimum (about 1.5 × the election timeout).
	TTL time.Duration
	// DialTimeout bounds the first contact in Watch: registering and
	// reading the first list (default 5s).
	DialTimeout time.Duration
	// RequestTimeout bounds every later request (default 5s).
	RequestTimeout time.Duration
	// TLS, when non-nil, secures the connections to etcd (https endpoints).
	TLS *tls.Config
	// Username and Password log in to etcd when its auth is enabled.
	Username, Password string
	// Logger receives the source's logs and the etcd client's; nil means
	// slog.Default().
	Logger *slog.Logger
}

// Etcd returns a Source that reads the mesh from etcd and, when self is not
// nil, registers self in it.
//
// Each Watch opens its own client. With self, it puts the JSON of self under
// Prefix+self.IID, attached to a lease of TTL that is kept alive for as long
// as the Watch's ctx: when the proxy is killed the lease expires and the
// member disappears; when ctx ends the lease is revoked (waiting at most
// RequestTimeout for etcd), so peers see the leave at once, and then the
// channel is closed. If the lease is lost (etcd was unreachable for longer than
// TTL) or the key is deleted by someone else, self is registered again,
// with a new lease if needed.
//
// Watch sends the full list at once (read with one Get) and after every
// put and delete under Prefix (watched from the Get's revision + 1, so no
// event is missed). When the watch breaks, for example because the
// revision it resumes from was compacted while etcd was unreachable, the
// list is read again in full. A value that is not a valid member is logged
// with its key and skipped. While etcd is unreachable the last list stays.
//
// Watch fails when etcd cannot be reached within DialTimeout, so that a
// proxy does not start on a wrong address.
func Etcd(cfg EtcdConfig, self *channels.Member) (channels.Source, error) {
	return newEtcd(cfg, self)
}

func newEtcd(cfg EtcdConfig, self *channels.Member) (*etcdSource, error) {
	var errs []error
	if len(cfg.Endpoints) == 0 {
		errs = append(errs, errors.New("no endpoints"))
	}
	if cfg.Prefix == "" {
		errs = append(errs, errors.New("empty prefix"))
	} else if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.TTL < 0 || cfg.DialTimeout < 0 || cfg.RequestTimeout < 0 {
		errs = append(errs, errors.New("negative TTL or timeout"))
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultEtcdTTL
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultEtcdDialTimeout
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = DefaultEtcdRequestTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &etcdSource{
		cfg: cfg,
		ttl: int64((cfg.TTL + time.Second - 1) / time.Second),
		log: cfg.Logger.With("membership", "etcd", "prefix", cfg.Prefix),
	}
	if self != nil {
		m := *self
		m.Channels = maps.Clone(m.Channels)
		if m.Channels == nil {
			m.Channels = map[string]uint16{}
		}
		if err := ValidateMember(m, true); err != nil {
			errs = append(errs, fmt.Errorf("self: %w", err))
		}
		val, err := json.Marshal(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("self: %w", err))
		}
		s.self, s.selfKey, s.selfVal = &m, cfg.Prefix+m.IID, string(val)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("etcd membership: %w", err)
	}
	return s, nil
}

type etcdSource struct {
	cfg     EtcdConfig
	ttl     int64 // seconds
	log     *slog.Logger
	self    *channels.Member
	selfKey string
	selfVal string

	// For tests: keepLease leaves the lease alive at the end of a Watch,
	// as if the proxy had been killed; leasesLost counts lost leases.
	keepLease  bool
	leasesLost atomic.Int64
}

func (s *etcdSource) Watch(ctx context.Context) (<-chan []channels.Member, error) {
	cli, err := s.newClient()
	if err != nil {
		return nil, fmt.Errorf("etcd membership %v: %w", s.cfg.Endpoints, err)
	}
	w := s.newWatch(cli)
	startCtx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	var lease etcdLease
	if s.self != nil {
		if lease, err = w.register(ctx, startCtx); err != nil {
			_ = cli.Close()
			return nil, fmt.Errorf("etcd membership %v: register %s: %w", s.cfg.Endpoints, s.selfKey, err)
		}
		s.log.Info("registered", "key", s.selfKey, "lease", lease.id, "ttl", s.ttl)
	}
	if err := w.resync(startCtx); err != nil {
		if s.self != nil {
			lease.stop()
			w.revoke(ctx, lease.id)
		}
		_ = cli.Close()
		return nil, fmt.Errorf("etcd membership %v: read %s: %w", s.cfg.Endpoints, s.cfg.Prefix, err)
	}
	var wg sync.WaitGroup
	if s.self != nil {
		wg.Go(func() { w.keepRegistered(ctx, lease) })
	}
	wg.Go(func() { w.watch(ctx) })
	go func() { // ends with ctx, as Source requires
		wg.Wait()
		_ = cli.Close()
		w.out.close()
	}()
	return w.out.ch, nil
}

func (s *etcdSource) newClient() (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   s.cfg.Endpoints,
		DialTimeout: s.cfg.DialTimeout,
		// Detect a dead etcd host that sends no reset; etcd refuses pings
		// more often than every 5s by default.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		PermitWithoutStream:  true,
		TLS:                  s.cfg.TLS,
		Username:             s.cfg.Username,
		Password:             s.cfg.Password,
		Logger:               newZapToSlog(s.log.With("component", "etcd-client")),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			// gRPC's default backoff grows to 2 minutes: too slow to
			// notice that a restarted etcd is back.
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second},
			MinConnectTimeout: s.cfg.DialTimeout,
		})},
	})
}

func (s *etcdSource) newWatch(cli *clientv3.Client) *etcdWatch {
	return &etcdWatch{
		src:     s,
		cli:     cli,
		log:     s.log,
		members: make(map[string]channels.Member),
		kick:    make(chan struct{}, 1),
		out:     newLatest(),
	}
}

// etcdWatch is one Watch: a client, the self registration and the list.
type etcdWatch struct {
	src *etcdSource
	cli *clientv3.Client
	log *slog.Logger
	// kick asks keepRegistered to put self again: the watch saw the key
	// deleted while the lease should hold it.
	kick chan struct{}
	out  *latest

	// Owned by the watch goroutine (and by Watch before it starts).
	rev       int64 // of the last event or Get applied
	members   map[string]channels.Member
	last      []channels.Member
	published bool
}

// etcdLease is a granted lease and its keepalive.
type etcdLease struct {
	id   clientv3.LeaseID
	ka   <-chan *clientv3.LeaseKeepAliveResponse
	stop context.CancelFunc
}

// register grants a lease, puts self under it and starts keeping it alive
// for as long as ctx; the requests are bounded by reqCtx.
func (w *etcdWatch) register(ctx, reqCtx context.Context) (etcdLease, error) {
	s := w.src
	g, err := w.cli.Grant(reqCtx, s.ttl)
	if err != nil {
		return etcdLease{}, fmt.Errorf("grant lease: %w", err)
	}
	if _, err := w.cli.Put(reqCtx, s.selfKey, s.selfVal, clientv3.WithLease(g.ID)); err != nil {
		w.revoke(ctx, g.ID)
		return etcdLease{}, fmt.Errorf("put: %w", err)
	}
	kaCtx, stop := context.WithCancel(ctx)
	ka, err := w.cli.KeepAlive(kaCtx, g.ID)
	if err != nil {
		stop()
		w.revoke(ctx, g.ID)
		return etcdLease{}, fmt.Errorf("keep lease alive: %w", err)
	}
	return etcdLease{id: g.ID, ka: ka, stop: stop}, nil
}

// revoke ends a lease, which deletes the keys still attached to it. It is
// best effort: a lease that is not revoked expires after the TTL.
func (w *etcdWatch) revoke(ctx context.Context, id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.src.cfg.RequestTimeout)
	defer cancel()
	if _, err := w.cli.Revoke(ctx, id); err != nil {
		w.log.Warn("could not revoke the lease; it expires after the TTL", "lease", id, "err", err)
	}
}

// keepRegistered keeps self registered until ctx ends, then revokes the
// lease.
func (w *etcdWatch) keepRegistered(ctx context.Context, lease etcdLease) {
	s := w.src
	defer func() {
		lease.stop()
		if lease.id != 0 && !s.keepLease {
			w.revoke(ctx, lease.id)
			w.log.Info("unregistered", "key", s.selfKey, "lease", lease.id)
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-lease.ka:
			if ok {
				continue // a keepalive response
			}
			if ctx.Err() != nil {
				return
			}
			s.leasesLost.Add(1)
			w.log.Warn("lease lost (expired, or etcd unreachable for longer than the TTL); registering again",
				"key", s.selfKey, "lease", lease.id)
			lease = w.reregister(ctx, lease)
		case <-w.kick:
			reqCtx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
			_, err := w.cli.Put(reqCtx, s.selfKey, s.selfVal, clientv3.WithLease(lease.id))
			cancel()
			if err == nil {
				w.log.Info("registered again after the key was deleted", "key", s.selfKey, "lease", lease.id)
				continue
			}
			if ctx.Err() != nil {
				return
			}
			// Most likely the lease was revoked or expired.
			w.log.Warn("could not register again under the current lease; taking a new one",
				"key", s.selfKey, "lease", lease.id, "err", err)
			lease = w.reregister(ctx, lease)
		}
	}
}

// reregister takes a new lease and puts self under it, retrying with
// backoff until it succeeds or ctx ends. The old lease, if still alive, is
// revoked after the key moved to the new one.
func (w *etcdWatch) reregister(ctx context.Context, old etcdLease) etcdLease {
	old.stop()
	var bo backoff
	for {
		reqCtx, cancel := context.WithTimeout(ctx, w.src.cfg.RequestTimeout)
		lease, err := w.register(ctx, reqCtx)
		cancel()
		if err == nil {
			w.log.Info("registered again", "key", w.src.selfKey, "lease", lease.id)
			if old.id != 0 {
				w.revokeQuietly(ctx, old.id)
			}
			return lease
		}
		if ctx.Err() != nil {
			return etcdLease{stop: func() {}}
		}
		d := bo.next()
		w.log.Warn("could not register; retrying", "key", w.src.selfKey, "err", err, "in", d)
		if !sleep(ctx, d) {
			return etcdLease{stop: func() {}}
		}
	}
}

// revokeQuietly revokes a lease that may well have expired already.
func (w *etcdWatch) revokeQuietly(ctx context.Context, id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(ctx, w.src.cfg.RequestTimeout)
	defer cancel()
	_, _ = w.cli.Revoke(ctx, id)
}

// watch follows the prefix until ctx ends, reading the whole list again
// whenever the watch breaks.
func (w *etcdWatch) watch(ctx context.Context) {
	var bo backoff
	for {
		progressed, err := w.watchOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if progressed {
			bo.reset()
		}
		w.log.Warn("watch ended; reading the member list again", "err", err, "revision", w.rev)
		for {
			if !progressed && !sleep(ctx, bo.next()) {
				return
			}
			progressed = false
			err := w.resync(ctx)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			w.log.Warn("could not read the member list; retrying", "err", err)
		}
	}
}

// watchOnce applies the events after w.rev until the watch breaks; it
// reports whether any response arrived.
func (w *etcdWatch) watchOnce(ctx context.Context) (progressed bool, err error) {
	// WithRequireLeader: a member cut off from its cluster ends the watch
	// instead of silently sending nothing.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	prefix := w.src.cfg.Prefix
	for resp := range w.cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(w.rev+1)) {
		if resp.CompactRevision != 0 {
			return progressed, fmt.Errorf("revision %d was compacted (oldest kept: %d)", w.rev+1, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			return progressed, err
		}
		if resp.Canceled {
			return progressed, errors.New("watch canceled by etcd")
		}
		progressed = true
		for _, ev := range resp.Events {
			w.apply(ctx, ev)
			w.rev = ev.Kv.ModRevision
		}
		if len(resp.Events) > 0 {
			w.publish()
		}
	}
	return progressed, errors.New("watch closed")
}

func (w *etcdWatch) apply(ctx context.Context, ev *clientv3.Event) {
	key := string(ev.Kv.Key)
	s := w.src
	if ev.Type == clientv3.EventTypeDelete {
		delete(w.members, key)
		if s.self != nil && key == s.selfKey && ctx.Err() == nil {
			w.kickRegistration()
		}
		return
	}
	m, err := decodeMember(strings.TrimPrefix(key, s.cfg.Prefix), ev.Kv.Value)
	if err != nil {
		delete(w.members, key)
		w.log.Error("ignoring a malformed member value", "key", key, "err", err)
		return
	}
	if s.self != nil && key == s.selfKey && string(ev.Kv.Value) != s.selfVal {
		w.log.Warn("another instance registered with this instance's iid", "key", key, "value", string(ev.Kv.Value))
	}
	w.members[key] = m
}

func (w *etcdWatch) kickRegistration() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// resync reads the whole list and publishes it if it changed.
func (w *etcdWatch) resync(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, w.src.cfg.RequestTimeout)
	defer cancel()
	s := w.src
	resp, err := w.cli.Get(ctx, s.cfg.Prefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	clear(w.members)
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		m, err := decodeMember(strings.TrimPrefix(key, s.cfg.Prefix), kv.Value)
		if err != nil {
			w.log.Error("ignoring a malformed member value", "key", key, "err", err)
			continue
		}
		w.members[key] = m
	}
	w.rev = resp.Header.Revision
	if _, ok := w.members[s.selfKey]; s.self != nil && !ok {
		w.kickRegistration()
	}
	w.publish()
	return nil
}

// publish sends the list, sorted by iid, if it changed.
func (w *etcdWatch) publish() {
	list := slices.SortedFunc(maps.Values(w.members), func(a, b channels.Member) int {
		return strings.Compare(a.IID, b.IID)
	})
	if w.published && equal(list, w.last) {
		return
	}
	w.published, w.last = true, list
	w.out.offer(clone(list))
}

// decodeMember decodes the etcd value of the member with the given iid
// (the key without the prefix). Unknown fields are ignored, so that newer
// proxies can add some.
func decodeMember(iid string, value []byte) (channels.Member, error) {
	if iid == "" {
		return channels.Member{}, errors.New("key has no iid after the prefix")
	}
	var m channels.Member
	if err := json.Unmarshal(value, &m); err != nil {
		return channels.Member{}, fmt.Errorf("not a member's JSON: %w", err)
	}
	if m.IID != iid {
		return channels.Member{}, fmt.Errorf("iid %q differs from the key's %q", m.IID, iid)
	}
	if m.Channels == nil {
		m.Channels = map[string]uint16{}
	}
	if err := ValidateMember(m, true); err != nil {
		return channels.Member{}, err
	}
	return m, nil
}
