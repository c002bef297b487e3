package proxybin

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Process is a proxy that a test starts, and may stop and start again,
// with the output of every start appended to one log file.
type Process struct {
	name, logPath string

	mu     sync.Mutex
	run    *run // the run started last
	starts int
}

// run is one start of the process.
type run struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd.Wait returned
	err  error         // cmd.Wait's result, set before done is closed
}

// NewProcess returns a process that logs to logPath, naming itself name
// in the line that begins each start's output.
func NewProcess(name, logPath string) *Process {
	return &Process{name: name, logPath: logPath}
}

// Start appends "=== e2e: start N of NAME at TIME" to the log and starts
// cmd, a ready command, with its standard output and error appended to
// the log. A goroutine waits for it: it ends when the process exits.
func (p *Process) Start(cmd *exec.Cmd) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	p.starts++
	fmt.Fprintf(logf, "=== e2e: start %d of %s at %s\n", p.starts, p.name, time.Now().Format(time.RFC3339Nano))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return err
	}
	r := &run{cmd: cmd, done: make(chan struct{})}
	go func() {
		r.err = cmd.Wait()
		close(r.done)
	}()
	p.run = r
	return nil
}

func (p *Process) current() (*run, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.run, p.starts
}

// closed is a done channel for a process never started.
var closed = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Done is closed when the run started last has exited (at once if none
// was started).
func (p *Process) Done() <-chan struct{} {
	if r, _ := p.current(); r != nil {
		return r.done
	}
	return closed
}

// Exited reports whether the run started last has exited (false if none
// was started).
func (p *Process) Exited() bool {
	r, _ := p.current()
	return r != nil && isClosed(r.done)
}

// Running reports whether a run was started and has not exited.
func (p *Process) Running() bool {
	r, _ := p.current()
	return r != nil && !isClosed(r.done)
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Err is the exit error of the run started last, once it has exited.
func (p *Process) Err() error {
	r, _ := p.current()
	if r == nil || !isClosed(r.done) {
		return nil
	}
	return r.err
}

// Signal sends sig to the run started last.
func (p *Process) Signal(sig os.Signal) error {
	r, _ := p.current()
	if r == nil {
		return fmt.Errorf("%s: not started", p.name)
	}
	return r.cmd.Process.Signal(sig)
}

// Pid is the process id of the run started last, 0 if none was started.
func (p *Process) Pid() int {
	r, _ := p.current()
	if r == nil {
		return 0
	}
	return r.cmd.Process.Pid
}

// Kill sends SIGKILL to the run started last (not waiting for it).
func (p *Process) Kill() error { return p.Signal(syscall.SIGKILL) }

// Wait waits at most limit until the run started last has exited, and
// reports whether it has.
func (p *Process) Wait(limit time.Duration) bool {
	select {
	case <-p.Done():
		return true
	case <-time.After(limit):
		return false
	}
}

// Stop sends SIGTERM to a running process and waits until it exits; if it
// has not after grace, it sends SIGKILL and waits for that. It reports
// whether the process exited within grace (true if it was not running).
func (p *Process) Stop(grace time.Duration) bool {
	done := p.Done()
	if isClosed(done) {
		return true
	}
	_ = p.Signal(syscall.SIGTERM)
	if p.Wait(grace) {
		return true
	}
	_ = p.Kill()
	<-done
	return false
}

// WaitLog waits at most limit until the log holds pattern once per start
// (so a restarted process must log it again), polling every 20ms. It
// reports whether it does: false on timeout, or as soon as the run
// started last has exited without.
func (p *Process) WaitLog(pattern string, limit time.Duration) bool {
	r, want := p.current()
	done := closed
	if r != nil {
		done = r.done
	}
	deadline := time.Now().Add(limit)
	for bytes.Count(p.ReadLog(), []byte(pattern)) < want {
		select {
		case <-done:
			// Exited: whatever it logged is in the file now.
			return bytes.Count(p.ReadLog(), []byte(pattern)) >= want
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// ReadLog returns the whole log (empty if it cannot be read).
func (p *Process) ReadLog() []byte {
	b, _ := os.ReadFile(p.logPath)
	return b
}

// Tail returns the last n lines of the log.
func (p *Process) Tail(n int) []byte { return Tail(p.ReadLog(), n) }

// Tail returns the last n lines of b.
func Tail(b []byte, lines int) []byte {
	for i, n := len(b)-1, 0; i >= 0; i-- {
		if b[i] == '\n' {
			if n++; n > lines {
				return b[i+1:]
			}
		}
	}
	return b
}

// LogPath is the log file's path.
func (p *Process) LogPath() string { return p.logPath }
