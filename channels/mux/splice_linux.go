//go:build linux

package mux

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Zero-copy data movement with splice(2), for sessions over TCP or Unix
// stream sockets whose streams are joined to other kernel sockets (the
// proxy's legacy connections). Bulk data then moves between the sockets as
// page references through kernel pipes, never copied into this process:
//
//   - send: legacy socket → pipe (Stream.SpliceFrom), and the writer
//     goroutine writes the frame header, then splices pipe → session socket;
//   - receive: the reader goroutine reads a large frame's header, then
//     splices its payload session socket → pipe, queued in the stream's
//     receive queue; Stream.WriteTo splices pipe → legacy socket. If
//     WriteTo waits with nothing queued, the reader splices the pipe on to
//     the legacy socket itself, as far as it takes the data at once
//     (Stream.deliverLocked).
//
// A pipe belongs to whoever holds references to it (a queued receive
// segment, a frame being sent, a goroutine splicing into it); the last
// reference returns it to a small pool if it is empty, or closes it.

// spliceSupported says whether this platform has splice(2).
const spliceSupported = true

// pipeSize is the capacity asked of every pipe, as Go's own splice does:
// 256 page slots. Without the privilege to raise it a pipe keeps 64 KiB,
// which only makes splices shorter. Tests lower it to fill pipes.
var pipeSize = 1 << 20

// maxFreePipes bounds the idle pipes kept for reuse (two descriptors each).
const maxFreePipes = 32

// pipeLimit bounds the pipes open at once, idle or not, so that splicing
// never takes the descriptors that connections need: 1024 pipes, or an
// eighth of the descriptor limit if that is less. Past it, data is copied.
// Tests lower it.
var pipeLimit atomic.Int32

func init() {
	n := int32(1024)
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil && lim.Cur/8 < uint64(n) {
		n = int32(lim.Cur / 8)
	}
	pipeLimit.Store(n)
}

func maxPipes() int32 { return pipeLimit.Load() }

// errTooManyPipes refuses a pipe beyond maxPipes.
var errTooManyPipes = errors.New("mux: splice: too many pipes open")

// kpipe is a kernel pipe used to move data by splice(2).
type kpipe struct {
	r, w int
	refs atomic.Int32
}

var pipePool struct {
	sync.Mutex
	free []*kpipe
}

// getPipe returns an empty pipe holding one reference.
func getPipe() (*kpipe, error) {
	pipePool.Lock()
	var p *kpipe
	if n := len(pipePool.free); n > 0 {
		p = pipePool.free[n-1]
		pipePool.free[n-1] = nil
		pipePool.free = pipePool.free[:n-1]
	}
	pipePool.Unlock()
	if p == nil {
		if pipesOpen.Add(1) > maxPipes() {
			pipesOpen.Add(-1)
			pipeShortages.Add(1)
			return nil, errTooManyPipes
		}
		var fds [2]int
		if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			pipesOpen.Add(-1)
			pipeShortages.Add(1)
			return nil, os.NewSyscallError("pipe2", err)
		}
		_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize) // best effort
		p = &kpipe{r: fds[0], w: fds[1]}
	}
	p.refs.Store(1)
	return p, nil
}

func (p *kpipe) ref() { p.refs.Add(1) }

// unref drops a reference; the last one recycles the pipe if the kernel
// says it is empty (data left in a pooled pipe would surface in another
// stream), and closes it otherwise.
func (p *kpipe) unref() {
	if p.refs.Add(-1) != 0 {
		return
	}
	if n, err := unix.IoctlGetInt(p.r, unix.TIOCINQ); err == nil && n == 0 {
		pipePool.Lock()
		if len(pipePool.free) < maxFreePipes {
			pipePool.free = append(pipePool.free, p)
			pipePool.Unlock()
			return
		}
		pipePool.Unlock()
	}
	p.close()
}

func (p *kpipe) close() {
	_ = unix.Close(p.r)
	_ = unix.Close(p.w)
	pipesOpen.Add(-1)
}

// rawConn returns c's RawConn if splice can use it: a TCP or Unix stream
// socket.
func rawConn(c any) syscall.RawConn {
	var sc syscall.Conn
	switch c := c.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// spliceConn returns the RawConn of the socket behind c, if c is a
// SpliceConn backed by a TCP socket.
func spliceConn(c any) syscall.RawConn {
	sc, ok := c.(SpliceConn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// fillPipe moves up to n bytes from the socket behind rc into the empty
// pipe p without waiting: 0 bytes and a nil error mean nothing to read now,
// io.EOF the socket's end.
func fillPipe(rc syscall.RawConn, p *kpipe, n int) (int, error) {
	var (
		m     int64
		errno error
	)
	err := rc.Read(func(fd uintptr) bool {
		m, errno = splice(int(fd), p.w, n, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case errno == unix.EAGAIN:
		return 0, nil // the pipe was empty: the socket has nothing now
	case errno != nil:
		return 0, os.NewSyscallError("splice", errno)
	case m == 0:
		return 0, io.EOF
	}
	return int(m), nil
}

// recvPipe moves up to n bytes from the socket behind rc into p, waiting
// for data. full reports that p has no room while the socket has data: the
// caller then reads the rest itself.
func recvPipe(rc syscall.RawConn, p *kpipe, n int) (m int, full bool, err error) {
	var errno error
	err = rc.Read(func(fd uintptr) bool {
		for {
			var k int64
			k, errno = splice(int(fd), p.w, n, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			m = int(k)
			if errno != unix.EAGAIN {
				return true
			}
			// No data, or no room in the pipe: only the socket can say.
			if avail, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil && avail > 0 {
				full, errno = true, nil
				return true
			}
			// No data. A full pipe fails splice(2) before it looks at the
			// socket, so it would not report the connection's end (EOF or
			// an error) either: ask the socket, and wait only if it has
			// nothing to say.
			var b [1]byte
			switch k, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT); {
			case err == unix.EAGAIN:
				return false // wait for data
			case err == unix.EINTR, err == nil && k > 0:
				continue // data arrived meanwhile
			default:
				m, errno = 0, err // k == 0: EOF
				return true
			}
		}
	})
	switch {
	case err != nil:
		return 0, false, err
	case errno != nil:
		return 0, false, os.NewSyscallError("splice", errno)
	case m == 0 && !full:
		return 0, false, io.ErrUnexpectedEOF
	}
	return m, full, nil
}

// pushPipe moves up to n bytes from p to the socket behind rc without
// waiting for room.
func pushPipe(rc syscall.RawConn, p *kpipe, n int) (int, error) {
	var (
		m     int64
		errno error
	)
	err := rc.Write(func(fd uintptr) bool {
		m, errno = splice(p.r, int(fd), n, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		return true
	})
	return tookNow(err, errno, int(m), "splice")
}

// writeNow writes b to the socket behind rc as far as it takes it without
// waiting, and returns how many bytes it took.
func writeNow(rc syscall.RawConn, b []byte) (int, error) {
	var (
		n     int
		errno error
	)
	err := rc.Write(func(fd uintptr) bool {
		for {
			n, errno = unix.Write(int(fd), b)
			if errno != unix.EINTR {
				return true
			}
		}
	})
	return tookNow(err, errno, n, "write")
}

// tookNow returns what a system call that must not wait moved to a socket:
// n bytes, none if the socket was full (EAGAIN), or its error.
func tookNow(err, errno error, n int, op string) (int, error) {
	switch {
	case err != nil:
		return 0, err
	case errno == unix.EAGAIN:
		return 0, nil
	case errno != nil:
		return 0, os.NewSyscallError(op, errno)
	}
	return n, nil
}

// splice moves up to n bytes from rfd to wfd, retrying when interrupted.
func splice(rfd, wfd, n, flags int) (int64, error) {
	for {
		m, err := unix.Splice(rfd, nil, wfd, nil, n, flags)
		if err != unix.EINTR {
			return m, err
		}
	}
}

// errPipeEmpty reports a pipe holding less than its owner accounted for:
// a bug, reported rather than waited on forever.
var errPipeEmpty = errors.New("mux: splice: pipe holds less data than expected")

// msgMore is sendmsg's flag that tells the kernel more data follows at
// once (a frame header is held for its spliced payload).
const msgMore = unix.MSG_MORE

// drainPipe moves exactly n bytes from p to the socket behind rc, waiting
// while the socket is full (within its write deadline). more tells the
// kernel that more data follows at once. progress, if not nil, is called
// after every splice that moved bytes but not all of them: the session's
// writer moves its write deadline on.
func drainPipe(rc syscall.RawConn, p *kpipe, n int, more bool, progress func()) error {
	flags := unix.SPLICE_F_NONBLOCK | unix.SPLICE_F_MOVE
	if more {
		flags |= unix.SPLICE_F_MORE
	}
	for n > 0 {
		var (
			m     int64
			errno error
		)
		err := rc.Write(func(fd uintptr) bool {
			m, errno = splice(p.r, int(fd), n, flags)
			if errno != unix.EAGAIN {
				return true
			}
			if avail, err := unix.IoctlGetInt(p.r, unix.TIOCINQ); err == nil && avail == 0 {
				errno = errPipeEmpty
				return true
			}
			return false // the socket is full: wait
		})
		switch {
		case err != nil:
			return err
		case errno == errPipeEmpty:
			return errPipeEmpty
		case errno != nil:
			return os.NewSyscallError("splice", errno)
		case m == 0:
			return errPipeEmpty
		}
		if n -= int(m); n > 0 && progress != nil {
			progress()
		}
	}
	return nil
}

// readPipe reads from p into b; the caller knows p holds at least len(b)
// bytes.
func readPipe(p *kpipe, b []byte) (int, error) {
	for {
		n, err := unix.Read(p.r, b)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN || n == 0:
			return 0, errPipeEmpty
		case err != nil:
			return 0, os.NewSyscallError("read", err)
		}
		return n, nil
	}
}

// idlePipes empties the pool of idle pipes, closing them, and returns how
// many there were (tests count descriptors).
func idlePipes() int {
	pipePool.Lock()
	defer pipePool.Unlock()
	n := len(pipePool.free)
	for i, p := range pipePool.free {
		p.close()
		pipePool.free[i] = nil
	}
	pipePool.free = pipePool.free[:0]
	return n
}
