package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tcpproxy/tcpproxy/proxy"
)

// legacyProcess runs the legacy program beside the proxy: started on
// Ready with the addresses in its environment, restarted or signalled on
// duplex membership changes, stopped (SIGTERM, then SIGKILL) on shutdown.
type legacyProcess struct {
	command  []string
	onChange string
	grace    time.Duration
	log      *slog.Logger
	env      *legacyEnv

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been waited for
	exit chan error    // unexpected exits
}

func newLegacyProcess(command []string, cfg *fileConfig, log *slog.Logger) *legacyProcess {
	grace := time.Duration(cfg.Legacy.StopTimeout)
	if grace == 0 {
		grace = 5 * time.Second
	}
	return &legacyProcess{
		command:  command,
		onChange: cfg.Legacy.OnChange,
		grace:    grace,
		log:      log.With("legacy", command[0]),
		env:      newLegacyEnv(cfg),
		exit:     make(chan error, 1),
	}
}

// exited delivers an exit of the program that stop did not ask for; nil
// when there is no program, so that selecting on it blocks.
func (l *legacyProcess) exited() <-chan error {
	if l == nil {
		return nil
	}
	return l.exit
}

func (l *legacyProcess) start() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	cmd := exec.Command(l.command[0], l.command[1:]...)
	cmd.Env = append(os.Environ(), l.env.vars()...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.SysProcAttr = legacySysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start legacy program %q: %w", l.command[0], err)
	}
	l.log.Info("legacy program started", "pid", cmd.Process.Pid)
	done := make(chan struct{})
	l.cmd, l.done = cmd, done
	go func() {
		err := cmd.Wait()
		close(done)
		l.mu.Lock()
		expected := l.cmd != cmd
		l.mu.Unlock()
		if !expected {
			if err == nil {
				err = fmt.Errorf("exited with status 0")
			}
			select {
			case l.exit <- err:
			default:
			}
		}
	}()
	return nil
}

// stop ends the program: SIGTERM, then SIGKILL after the grace period.
func (l *legacyProcess) stop() {
	l.mu.Lock()
	cmd, done := l.cmd, l.done
	l.cmd = nil
	l.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(l.grace):
		l.log.Warn("legacy program ignored SIGTERM; killing", "pid", cmd.Process.Pid)
		_ = cmd.Process.Kill()
		<-done
	}
	l.log.Info("legacy program stopped", "pid", cmd.Process.Pid)
}

// membershipChanged applies legacy.onChange.
func (l *legacyProcess) membershipChanged() error {
	l.mu.Lock()
	running := l.cmd != nil
	l.mu.Unlock()
	if !running {
		return nil
	}
	switch l.onChange {
	case "", "ignore":
		return nil
	case "restart":
		l.stop()
		return l.start()
	default:
		sig, _ := signalByName(l.onChange)
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.cmd == nil {
			return nil
		}
		return l.cmd.Process.Signal(sig)
	}
}

func signalByName(name string) (syscall.Signal, bool) {
	n := strings.TrimPrefix(strings.ToUpper(name), "SIG")
	for _, s := range []struct {
		name string
		sig  syscall.Signal
	}{{"HUP", syscall.SIGHUP}, {"USR1", syscall.SIGUSR1}, {"USR2", syscall.SIGUSR2}, {"TERM", syscall.SIGTERM}, {"INT", syscall.SIGINT}, {"QUIT", syscall.SIGQUIT}} {
		if s.name == n {
			return s.sig, true
		}
	}
	return 0, false
}

// legacyEnv is the environment given to the legacy program:
//
//	TCPPROXY_IID, TCPPROXY_ROLE, TCPPROXY_BIND_IP
//	TCPPROXY_<CHANNEL>_IP, TCPPROXY_<CHANNEL>_PORT   request: where to connect;
//	                                                  reply, duplex: where to bind
//	TCPPROXY_<CHANNEL>_MEMBERS                        duplex: iid=ip:port,... (self included)
//
// <CHANNEL> is the channel name upper-cased with every character that is
// not a letter or digit replaced by '_'.
type legacyEnv struct {
	mu   sync.Mutex
	cfg  *fileConfig
	vals map[string]string
}

func newLegacyEnv(cfg *fileConfig) *legacyEnv {
	return &legacyEnv{cfg: cfg, vals: map[string]string{
		"TCPPROXY_IID":  cfg.IID,
		"TCPPROXY_ROLE": cfg.Role,
	}}
}

func envName(channel string) string {
	var b strings.Builder
	for _, r := range strings.ToUpper(channel) {
		if (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return "TCPPROXY_" + b.String()
}

func (e *legacyEnv) ready(r proxy.Ready) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.vals["TCPPROXY_BIND_IP"] = r.BindIP.String()
	for name, cc := range e.cfg.Channels {
		if cc.Kind != proxy.KindRequest {
			e.vals[envName(name)+"_IP"] = r.BindIP.String()
			e.vals[envName(name)+"_PORT"] = fmt.Sprint(cc.Port)
		}
	}
}

func (e *legacyEnv) change(c proxy.Change) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if c.Kind == proxy.KindRequest {
		e.vals[envName(c.Channel)+"_IP"] = c.IP.String()
		e.vals[envName(c.Channel)+"_PORT"] = fmt.Sprint(c.Port)
		return
	}
	e.vals[envName(c.Channel)+"_MEMBERS"] = formatMembers(c.Members)
}

func (e *legacyEnv) vars() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, 0, len(e.vals))
	for k, v := range e.vals {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out
}

func formatMembers(ms []proxy.MemberAddr) string {
	parts := make([]string, 0, len(ms))
	for _, m := range ms {
		parts = append(parts, fmt.Sprintf("%s=%s:%d", m.IID, m.IP, m.Port))
	}
	return strings.Join(parts, ",")
}
