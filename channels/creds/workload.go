package creds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// WorkloadConfig says where the SPIFFE Workload API is and how SPIFFE IDs
// name instances.
type WorkloadConfig struct {
	// Addr is the Workload API endpoint, e.g.
	// unix:///run/spire/sockets/agent.sock (see workloadapi.WithAddr).
	Addr string
	// SPIFFE maps SPIFFE IDs to instances; the SVID presented is the
	// Workload API's default one, and peers are verified against the
	// bundle of the mapping's trust domain.
	SPIFFE *pki.SPIFFEMapping
	Options
}

// Workload are credentials streamed by the SPIFFE Workload API (a SPIRE
// agent, say): the X.509 SVID to present and the trust domain's bundle,
// both rotated by the agent. They implement pki.Credentials.
type Workload struct {
	cfg WorkloadConfig
	src *workloadapi.X509Source
	cur atomic.Pointer[pki.Material]
	h   *holder

	done chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// WatchWorkload connects to the Workload API and waits, within ctx, for
// the first SVID and bundle; it follows their updates until Close.
func WatchWorkload(ctx context.Context, cfg WorkloadConfig) (*Workload, error) {
	if cfg.SPIFFE == nil {
		return nil, errors.New("workload API: no SPIFFE mapping")
	}
	if err := workloadapi.ValidateAddress(cfg.Addr); err != nil {
		return nil, fmt.Errorf("workload API address %q: %w", cfg.Addr, err)
	}
	w := &Workload{cfg: cfg, h: newHolder(cfg.Options), done: make(chan struct{})}
	var err error
	w.src, err = workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr(cfg.Addr), workloadapi.WithLogger(spiffeLogger{w.h.log})))
	if err != nil {
		return nil, fmt.Errorf("workload API %s: first SVID: %w", cfg.Addr, err)
	}
	if err := w.update(); err != nil {
		_ = w.src.Close()
		return nil, fmt.Errorf("workload API %s: %w", cfg.Addr, err)
	}
	w.wg.Go(w.run)
	return w, nil
}

// update puts the source's SVID and bundle in use, if they are good.
func (w *Workload) update() error {
	svid, err := w.src.GetX509SVID()
	if err != nil {
		return err
	}
	m, err := pki.MaterialFromSVID(svid, w.src, w.cfg.SPIFFE)
	if err == nil {
		err = w.cfg.checkSelf(m)
	}
	if err != nil {
		return fmt.Errorf("SVID %s: %w", svid.ID, err)
	}
	w.cur.Store(m)
	w.h.loaded(m.Leaf(), describe(m)...)
	return nil
}

func (w *Workload) run() {
	alarm := time.NewTimer(time.Hour)
	w.h.resetAlarm(alarm)
	defer alarm.Stop()
	for {
		select {
		case <-w.done:
			return
		case <-w.src.Updated():
			if err := w.update(); err != nil {
				w.h.failed(err.Error(), err)
			}
		case <-alarm.C:
			w.h.checkExpiry(time.Now())
		}
		w.h.resetAlarm(alarm)
	}
}

// Current returns the credentials in use.
func (w *Workload) Current() *pki.Material { return w.cur.Load() }

// Stats reports the SVID in use and the rotations so far.
func (w *Workload) Stats() Stats { return w.h.stats() }

// Close disconnects from the Workload API; Current keeps returning the
// last credentials.
func (w *Workload) Close() error {
	var err error
	w.once.Do(func() {
		close(w.done)
		w.wg.Wait()
		err = w.src.Close()
	})
	return err
}

// spiffeLogger passes go-spiffe's logs to slog. Its errors are about the
// connection to the agent, which it retries: warnings here.
type spiffeLogger struct{ log *slog.Logger }

func (l spiffeLogger) Debugf(format string, args ...any) {
	l.log.Debug("workload API", "detail", fmt.Sprintf(format, args...))
}

func (l spiffeLogger) Infof(format string, args ...any) {
	l.log.Info("workload API", "detail", fmt.Sprintf(format, args...))
}

func (l spiffeLogger) Warnf(format string, args ...any) {
	l.log.Warn("workload API", "detail", fmt.Sprintf(format, args...))
}

func (l spiffeLogger) Errorf(format string, args ...any) {
	l.log.Warn("workload API", "detail", fmt.Sprintf(format, args...))
}
