package creds

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// DefaultPoll is the default FilesConfig.Poll.
const DefaultPoll = time.Minute

// settle is how long the files must be quiet after a change before they
// are read: writers that are not atomic (cp, an editor) then have
// finished, and a Kubernetes volume update is one burst of events.
const settle = 100 * time.Millisecond

// FilesConfig names the PEM files of a certificate, its key and a CA
// bundle. The files may be symbolic links, and are usually in one
// directory, such as a mounted Kubernetes secret.
type FilesConfig struct {
	Cert, Key, CA string
	// SPIFFE, when set, names instances by SPIFFE ID: the certificate
	// must be an X.509 SVID, and the CA bundle holds the trust domain's
	// roots. Nil names them by tcpproxy URI.
	SPIFFE *pki.SPIFFEMapping
	// Poll is how often the files are read to catch changes that
	// file-system notifications missed (network file systems, a watch
	// limit reached); default DefaultPoll.
	Poll time.Duration
	Options
}

// Files are credentials loaded from PEM files and reloaded when they
// change. They implement pki.Credentials.
type Files struct {
	cur  atomic.Pointer[pki.Material]
	w    *fileWatch
	done chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// WatchFiles loads cfg's files and watches them until Close. The first
// load must succeed: files that are missing, do not parse, hold a key
// that does not match the certificate or a certificate that is not valid
// now (expired, or not yet valid), fail here.
func WatchFiles(cfg FilesConfig) (*Files, error) {
	f := &Files{done: make(chan struct{})}
	opts := cfg.Options
	w, err := loadFiles(cfg, func(cert, key, ca []byte) (*x509.Certificate, []any, error) {
		m, err := pki.ParseMaterial(cert, key, ca, cfg.SPIFFE)
		if err == nil {
			err = opts.checkSelf(m)
		}
		if err != nil {
			return nil, nil, err
		}
		f.cur.Store(m)
		return m.Leaf(), describe(m), nil
	})
	if err != nil {
		return nil, err
	}
	f.w = w
	w.notify()
	f.wg.Go(func() { w.run(f.done) })
	return f, nil
}

// Current returns the credentials in use.
func (f *Files) Current() *pki.Material { return f.cur.Load() }

// Stats reports the certificate in use and the reloads so far.
func (f *Files) Stats() Stats { return f.w.h.stats() }

// Close stops watching; Current keeps returning the last credentials.
func (f *Files) Close() error {
	f.once.Do(func() {
		close(f.done)
		f.wg.Wait()
	})
	return nil
}

// ClientFiles are a client certificate and the CA bundle that verifies
// servers by host name, loaded from PEM files and reloaded when they
// change: the credentials of a client of a registry such as etcd, whose
// certificates name hosts, not instances. See TLSConfig for what follows
// a rotation.
type ClientFiles struct {
	cur     atomic.Pointer[clientCert]
	w       *fileWatch
	running atomic.Bool
}

type clientCert struct {
	cert  tls.Certificate
	roots *x509.CertPool
}

// LoadClientFiles loads client credentials as WatchFiles does, and Run
// keeps them current; cfg.SPIFFE and cfg.Self must not be set.
func LoadClientFiles(cfg FilesConfig) (*ClientFiles, error) {
	if cfg.SPIFFE != nil || cfg.Self != nil {
		return nil, errors.New("client credentials name no instance: SPIFFE and Self do not apply")
	}
	c := &ClientFiles{}
	w, err := loadFiles(cfg, func(certPEM, keyPEM, caPEM []byte) (*x509.Certificate, []any, error) {
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, nil, fmt.Errorf("certificate and key: %w", err)
		}
		if err := pki.CheckValidity(cert.Leaf, time.Now()); err != nil {
			return nil, nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(caPEM) {
			return nil, nil, errors.New("CA bundle: holds no PEM certificate")
		}
		c.cur.Store(&clientCert{cert: cert, roots: roots})
		return cert.Leaf, []any{"subject", cert.Leaf.Subject.String()}, nil
	})
	if err != nil {
		return nil, err
	}
	c.w = w
	return c, nil
}

// TLSConfig returns a client configuration that presents the current
// certificate at each handshake, and verifies servers by the standard
// rules (chain and host name) against the CA bundle current when it is
// called: a server's host name is not known to a verification callback
// when the server is dialed by IP address, so the bundle cannot follow
// rotations behind crypto/tls's back. A client made from it at start
// keeps that bundle; keep the old CA in it while the server's CA rotates.
func (c *ClientFiles) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    c.cur.Load().roots,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &c.cur.Load().cert, nil
		},
	}
}

// Run reloads the files when they change, until ctx ends. A Run while
// another runs returns at once.
func (c *ClientFiles) Run(ctx context.Context) {
	if !c.running.CompareAndSwap(false, true) {
		return
	}
	defer c.running.Store(false)
	c.w.notify()
	c.w.run(ctx.Done())
}

// Stats reports the certificate in use and the reloads so far.
func (c *ClientFiles) Stats() Stats { return c.w.h.stats() }

// newNotifier is fsnotify.NewWatcher; tests replace it to poll only.
var newNotifier = fsnotify.NewWatcher

// fileWatch reloads three files when they change. load parses their
// contents and, when they are good, puts them in use and returns the
// certificate and log attributes describing it.
type fileWatch struct {
	files [3]string // cert, key, CA
	poll  time.Duration
	load  func(cert, key, ca []byte) (*x509.Certificate, []any, error)
	h     *holder

	inUse [sha256.Size]byte // digest of the contents in use

	// Owned by run.
	fw      *fsnotify.Watcher // nil: polling only
	watched map[string]bool   // directories watched
}

// loadFiles loads cfg's files for the first time.
func loadFiles(cfg FilesConfig, load func(cert, key, ca []byte) (*x509.Certificate, []any, error)) (*fileWatch, error) {
	w := &fileWatch{
		files: [3]string{cfg.Cert, cfg.Key, cfg.CA},
		poll:  cfg.Poll,
		load:  load,
		h:     newHolder(cfg.Options),
	}
	if w.poll <= 0 {
		w.poll = DefaultPoll
	}
	data, sum, err := w.read()
	if err != nil {
		return nil, err
	}
	leaf, attrs, err := load(data[0], data[1], data[2])
	if err != nil {
		return nil, w.explain(err)
	}
	w.inUse = sum
	w.h.loaded(leaf, attrs...)
	return w, nil
}

// explain names the files in err.
func (w *fileWatch) explain(err error) error {
	return fmt.Errorf("credentials from %s, %s and %s: %w", w.files[0], w.files[1], w.files[2], err)
}

// read returns the files' contents and their digest.
func (w *fileWatch) read() (data [3][]byte, sum [sha256.Size]byte, err error) {
	h := sha256.New()
	for i, name := range w.files {
		if data[i], err = os.ReadFile(name); err != nil {
			return data, sum, err
		}
		_ = binary.Write(h, binary.BigEndian, uint64(len(data[i])))
		h.Write(data[i])
	}
	copy(sum[:], h.Sum(nil))
	return data, sum, nil
}

// reload loads the files if they changed. When the contents fail to load
// and were changing while read (a writer caught half-way, a symlink
// swapped between two reads), they are read again before the failure is
// reported.
func (w *fileWatch) reload() {
	defer w.rewatch()
	var lastSum [sha256.Size]byte
	for attempt := 0; ; attempt++ {
		data, sum, err := w.read()
		if err != nil {
			w.h.failed("read:"+err.Error(), w.explain(err))
			return
		}
		if sum == w.inUse {
			return
		}
		leaf, attrs, err := w.load(data[0], data[1], data[2])
		if err == nil {
			w.inUse = sum
			w.h.loaded(leaf, attrs...)
			return
		}
		if attempt >= 2 || (attempt > 0 && sum == lastSum) {
			// Keyed by content: the same files fail once, though the
			// error may vary (a certificate valid "in 5m" and then "in 4m").
			w.h.failed(hex.EncodeToString(sum[:]), w.explain(err))
			return
		}
		lastSum = sum
	}
}

// rewatch watches the directories of the files and of what their symbolic
// links point to now: a Kubernetes volume swaps its ..data link in the
// files' directory, while a link to a file elsewhere changes there.
func (w *fileWatch) rewatch() {
	if w.fw == nil {
		return
	}
	want := make(map[string]bool)
	for _, f := range w.files {
		want[filepath.Dir(f)] = true
		if real, err := filepath.EvalSymlinks(f); err == nil {
			want[filepath.Dir(real)] = true
		}
	}
	for d := range w.watched {
		if !want[d] {
			_ = w.fw.Remove(d) // gone with its directory, perhaps
			delete(w.watched, d)
		}
	}
	for d := range want {
		if w.watched[d] {
			continue
		}
		if err := w.fw.Add(d); err != nil {
			w.h.log.Debug("cannot watch a TLS directory; polling covers it", "dir", d, "err", err)
			continue
		}
		w.watched[d] = true
	}
}

// notify starts file-system notifications for the files; the goroutine
// that then calls run owns them.
func (w *fileWatch) notify() {
	var err error
	if w.fw, err = newNotifier(); err != nil {
		w.h.log.Warn("cannot watch the TLS files; checking them by polling only", "every", w.poll, "err", err)
	}
	w.watched = make(map[string]bool)
	w.rewatch()
}

// run reloads the files when they change, until stop is closed; notify
// must have been called.
func (w *fileWatch) run(stop <-chan struct{}) {
	if w.fw != nil {
		defer w.fw.Close()
	}
	// A change between the first load and the first watch is not missed.
	w.reload()
	poll := time.NewTicker(w.poll)
	defer poll.Stop()
	quiet := time.NewTimer(settle)
	quiet.Stop()
	alarm := time.NewTimer(time.Hour)
	w.h.resetAlarm(alarm)
	defer alarm.Stop()
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w.fw != nil {
		events, errs = w.fw.Events, w.fw.Errors
	}
	for {
		select {
		case <-stop:
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			quiet.Reset(settle)
			continue
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			// Events may have been lost (a queue overflow): look.
			w.h.log.Debug("watching the TLS files", "err", err)
			quiet.Reset(settle)
			continue
		case <-quiet.C:
			w.reload()
		case <-poll.C:
			w.reload()
			w.h.checkExpiry(time.Now())
		case <-alarm.C:
			w.h.checkExpiry(time.Now())
		}
		w.h.resetAlarm(alarm)
	}
}
