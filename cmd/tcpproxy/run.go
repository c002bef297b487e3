package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/creds"
	"github.com/tcpproxy/tcpproxy/channels/pki"
	"github.com/tcpproxy/tcpproxy/proxy"
)

func cmdRun(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "configuration file (YAML)")
	verbose := fs.Bool("v", false, "debug logs (overrides log.level)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return usageError{errors.New("-config is required")}
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	if err := cfg.checkMembersFile(); err != nil {
		return fmt.Errorf("config %s: %w", *configPath, err)
	}
	level, _ := parseLevel(cfg.Log.Level) // validated
	if *verbose {
		level = slog.LevelDebug
	}
	// The proxy and the node add the iid to their own logs.
	return runInstance(ctx, cfg, fs.Args(), newLogger(stderr, cfg.Log.Format, level))
}

// instance is one running proxy with its mesh node.
type instance struct {
	node  *channels.Node
	proxy *proxy.Proxy
	cfg   *fileConfig
	creds creds.Source // nil without TLS
}

// startInstance builds and starts the mesh node and the proxy of cfg,
// with the membership cfg names.
func startInstance(ctx context.Context, cfg *fileConfig, network proxy.Network, log *slog.Logger, obs *observer) (*instance, error) {
	src, err := membersFor(cfg, log)
	if err != nil {
		return nil, err
	}
	return startInstanceWith(ctx, cfg, network, src, log, obs)
}

// startInstanceWith is startInstance with the membership given.
// obs, when not nil, receives the instance's metrics.
func startInstanceWith(ctx context.Context, cfg *fileConfig, network proxy.Network, src channels.Source, log *slog.Logger, obs *observer) (_ *instance, err error) {
	tlsCreds, err := cfg.TLS.transportCredentials(ctx, pki.Identity{IID: cfg.IID, Role: cfg.Role}, log)
	if err != nil {
		return nil, err
	}
	if tlsCreds != nil {
		defer func() {
			if err != nil {
				_ = tlsCreds.Close()
			}
		}()
	}
	transport := channels.TCPTransport()
	if cfg.Transport.SameHost == "tcp" {
		transport = channels.PlainTCPTransport()
	}
	node, err := channels.NewNode(channels.Config{
		IID: cfg.IID, Role: cfg.Role, ListenAddr: cfg.Listen,
		TLS: tlsCreds, Members: src, Logger: log,
		KeepAliveInterval:  time.Duration(cfg.Transport.KeepAlive),
		OnHandshake:        obs.onHandshake(),
		DialTimeout:        time.Duration(cfg.Transport.DialTimeout),
		HandshakeTimeout:   time.Duration(cfg.Transport.HandshakeTimeout),
		SessionsPerPeer:    cfg.Transport.Sessions,
		Transport:          transport,
		Insecure:           cfg.Transport.Insecure,
		MaxSessionAge:      time.Duration(cfg.Transport.MaxSessionAge),
		MaxHandshakes:      cfg.Transport.MaxHandshakes,
		MaxHandshakesPerIP: cfg.Transport.MaxHandshakesPerIP,
		MaxStreamWindow:    uint32(cfg.Transport.MaxStreamWindow), // validated
		MaxSessionBuffered: int64(cfg.Transport.MaxSessionBuffered),
		CongestionControl:  cfg.Transport.CongestionControl,
		OnRefused:          obs.onRefused(),
	})
	if err != nil {
		return nil, err
	}
	addressing, _ := cfg.addressing() // validated
	p, err := proxy.New(proxy.Config{
		IID: cfg.IID, Role: cfg.Role, Channels: cfg.Channels,
		Addressing: addressing, Network: network, Mesh: node, Logger: log,
	})
	if err != nil {
		_ = node.Close()
		return nil, err
	}
	if err := node.Start(ctx); err != nil {
		_ = node.Close()
		return nil, fmt.Errorf("start transport: %w", err)
	}
	if err := p.Start(ctx); err != nil {
		_ = node.Close()
		return nil, err
	}
	return &instance{node: node, proxy: p, cfg: cfg, creds: tlsCreds}, nil
}

// stop drains the proxy for at most drain, then closes the node and stops
// following credential rotations.
func (in *instance) stop(drain time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	err := in.proxy.Shutdown(ctx)
	err = errors.Join(err, in.node.Close())
	if in.creds != nil {
		err = errors.Join(err, in.creds.Close())
	}
	return err
}

// runInstance runs one proxy until ctx ends, with the legacy program
// (command, may be empty) started on Ready and stopped before the drain.
func runInstance(ctx context.Context, cfg *fileConfig, command []string, log *slog.Logger) error {
	network, err := networkFor(cfg, log)
	if err != nil {
		return err
	}
	defer network.Close()
	obs := newObserver(cfg.IID)
	obs.transport.SetInsecure(cfg.Transport.Insecure && !cfg.hasTLS())
	if cfg.Admin != "" {
		stopAdmin, err := startAdmin(cfg.Admin, log, obs)
		if err != nil {
			return err
		}
		defer stopAdmin()
	}
	if cfg.Metrics != "" {
		_, stopMetrics, err := startMetrics(cfg.Metrics, log, obs)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	in, err := startInstance(ctx, cfg, network, log, obs)
	log = log.With("iid", cfg.IID)
	if err != nil {
		return err
	}
	obs.attach(in)
	drain := time.Duration(cfg.DrainTimeout)
	if drain == 0 {
		drain = 10 * time.Second
	}
	var child *legacyProcess
	if len(command) > 0 {
		child = newLegacyProcess(command, cfg, log)
	}
	defer func() {
		if child != nil {
			child.stop()
		}
	}()
	// Start queued Ready, one Change per request and duplex channel, then
	// Synced: the program starts once all of them are in its environment.
	synced := false
	events := in.proxy.Events()
	for {
		select {
		case <-ctx.Done():
			obs.ready.Store(false)
			log.Info("shutting down", "drain", drain)
			if child != nil {
				child.stop()
			}
			err := in.stop(drain)
			for e := range events {
				logEvent(log, e)
			}
			if errors.Is(err, context.DeadlineExceeded) {
				// Asked to stop, and stopped: connections still open at the
				// drain deadline were reset, which is what drainTimeout
				// promises, not a failure of the stop.
				log.Warn("drain deadline passed", "err", err)
				return nil
			}
			return err
		case exit := <-child.exited():
			log.Error("legacy program exited; shutting down", "err", exit)
			err := in.stop(drain)
			for e := range events {
				logEvent(log, e)
			}
			return errors.Join(fmt.Errorf("legacy program: %w", exit), err)
		case e := <-events:
			logEvent(log, e)
			if _, ok := e.(proxy.Ready); ok {
				obs.ready.Store(true)
			}
			if e, ok := e.(proxy.Error); ok && errors.Is(e, proxy.ErrNetworkFailed) {
				// Nothing reaches the instance any more: exit, so that a
				// supervisor restarts it, rather than pass for ready.
				obs.ready.Store(false)
				log.Error("network failed; shutting down", "err", e.Err)
				if child != nil {
					child.stop()
				}
				err := in.stop(drain)
				for e := range events {
					logEvent(log, e)
				}
				return errors.Join(e.Err, err)
			}
			if child == nil {
				continue
			}
			switch e := e.(type) {
			case proxy.Ready:
				child.env.ready(e)
			case proxy.Change:
				child.env.change(e)
				if e.Kind == proxy.KindDuplex && synced {
					if err := child.membershipChanged(); err != nil {
						log.Error("legacy program", "err", err)
					}
				}
			case proxy.Synced:
				synced = true
				if err := child.start(); err != nil {
					_ = in.stop(drain)
					return err
				}
			}
		}
	}
}

func logEvent(log *slog.Logger, e proxy.Event) {
	switch e := e.(type) {
	case proxy.Ready:
		log.Info("event ready", "bindIP", e.BindIP)
	case proxy.Change:
		if e.Kind == proxy.KindRequest {
			log.Info("event change", "channel", e.Channel, "listening", e.Listening, "ip", e.IP, "port", e.Port)
		} else {
			log.Info("event change", "channel", e.Channel, "members", formatMembers(e.Members))
		}
	case proxy.Synced:
		log.Info("event synced")
	case proxy.Error:
		log.Error("event error", "channel", e.Channel, "err", e.Err)
	case proxy.Closed:
		log.Info("event close")
	}
}
