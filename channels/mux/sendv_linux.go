//go:build linux

package mux

import (
	"io"
	"math/bits"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/internal/sockopt"
)

// maxIOV is the most pieces one sendmsg(2) takes (the kernel's UIO_MAXIOV);
// a call with more fails with EMSGSIZE.
const maxIOV = 1024

// sockWriter writes scattered pieces to a TCP or Unix stream socket with
// sendmsg(2), at most maxIOV pieces per call, waiting on the poller while
// the socket is full. Between calls that made progress it calls progress,
// which moves the write deadline on: the deadline bounds a wait in which
// nothing moves, not the whole write.
type sockWriter struct {
	rc       syscall.RawConn
	progress func()
	out      *atomic.Uint64 // counts the bytes written

	// The call in progress, kept here so that send, the poller's
	// callback, is made once (a method value) and not per call.
	vecs  []unix.Iovec
	flags int
	n     int
	errno syscall.Errno
	send  func(fd uintptr) bool
}

func newSockWriter(conn any, progress func(), out *atomic.Uint64) *sockWriter {
	rc := rawConn(conn)
	if rc == nil {
		return nil
	}
	w := &sockWriter{rc: rc, progress: progress, out: out}
	w.send = w.sendmsg
	return w
}

// write writes every byte of iov, whose pieces it consumes, with flags
// (such as MSG_MORE) on every call. It calls progress after every call
// but the last.
func (w *sockWriter) write(iov [][]byte, flags int) error {
	defer func() {
		clear(w.vecs) // drop the references to the callers' buffers
		w.vecs = w.vecs[:0]
	}()
	iov = skipEmpty(iov)
	for len(iov) > 0 {
		w.vecs = w.vecs[:0]
		for _, b := range iov {
			if len(w.vecs) == maxIOV {
				break
			}
			if len(b) > 0 {
				v := unix.Iovec{Base: &b[0]}
				v.SetLen(len(b))
				w.vecs = append(w.vecs, v)
			}
		}
		w.flags = flags | unix.MSG_NOSIGNAL
		if err := w.rc.Write(w.send); err != nil {
			return err
		}
		switch {
		case w.errno != 0:
			return os.NewSyscallError("sendmsg", w.errno)
		case w.n == 0:
			return io.ErrShortWrite // a stream socket never takes nothing
		}
		w.out.Add(uint64(w.n))
		for n := w.n; n > 0; {
			k := min(n, len(iov[0]))
			iov[0] = iov[0][k:]
			n -= k
			iov = skipEmpty(iov)
		}
		if len(iov) > 0 {
			w.progress()
		}
	}
	return nil
}

// skipEmpty drops iov's leading empty pieces.
func skipEmpty(iov [][]byte) [][]byte {
	for len(iov) > 0 && len(iov[0]) == 0 {
		iov = iov[1:]
	}
	return iov
}

// sendmsg is the poller's callback: it reports false to wait for room.
func (w *sockWriter) sendmsg(fd uintptr) bool {
	var msg unix.Msghdr
	msg.Iov = &w.vecs[0]
	msg.SetIovlen(len(w.vecs))
	for {
		n, _, errno := unix.Syscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), uintptr(w.flags))
		switch errno {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		w.n, w.errno = int(n), errno
		return true
	}
}

// tcpConn returns the TCP socket under conn, under TLS too, for
// tcpBytesAcked; nil if there is none.
func tcpConn(conn net.Conn) syscall.RawConn {
	tc := sockopt.TCPConn(conn)
	if tc == nil {
		return nil
	}
	return rawConn(tc)
}

// tcpInfo returns the TCP socket rc's TCP_INFO, if it can tell.
func tcpInfo(rc syscall.RawConn) (*unix.TCPInfo, bool) {
	if rc == nil {
		return nil, false
	}
	var info *unix.TCPInfo
	if err := sockopt.Control(rc, func(fd int) (err error) {
		info, err = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		return err
	}); err != nil {
		return nil, false
	}
	return info, true
}

// tcpBytesAcked returns the bytes the peer acknowledged on the TCP socket
// rc (TCP_INFO), if it can tell.
func tcpBytesAcked(rc syscall.RawConn) (uint64, bool) {
	info, ok := tcpInfo(rc)
	if !ok {
		return 0, false
	}
	return info.Bytes_acked, true
}

// tcpSilence returns how long the TCP socket rc has heard no
// acknowledgement while it retransmits data after a timeout (0 if it does
// not): data in flight, the retransmission timer has fired, and the peer
// has acknowledged nothing since.
func tcpSilence(rc syscall.RawConn) time.Duration {
	info, ok := tcpInfo(rc)
	if !ok || info.Unacked == 0 || info.Backoff == 0 {
		return 0
	}
	return time.Duration(info.Last_ack_recv) * time.Millisecond
}

// tcpPaceState returns what the pacer reads from the TCP socket rc's
// TCP_INFO.
func tcpPaceState(rc syscall.RawConn) (tcpPace, bool) {
	info, ok := tcpInfo(rc)
	if !ok {
		return tcpPace{}, false
	}
	return tcpPace{
		acked:   info.Bytes_acked,
		sent:    info.Bytes_sent - info.Bytes_retrans,
		notSent: info.Notsent_bytes,
		// As the kernel computes it: the deviation counts for at least
		// the minimum timeout (tcp_rto_min, 200ms).
		rto: time.Duration(info.Rtt)*time.Microsecond + max(4*time.Duration(info.Rttvar)*time.Microsecond, 200*time.Millisecond),
	}, true
}

// setTCPOption sets the TCP-level socket option name of the socket rc to v.
func setTCPOption(rc syscall.RawConn, name, v int) error {
	return sockopt.Control(rc, func(fd int) error { return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, name, v) })
}

// shutdownWrite shuts the sending side of the TCP socket rc (the kernel
// sends a FIN after what is queued), and reports whether it did.
func shutdownWrite(rc syscall.RawConn) bool {
	return sockopt.Control(rc, func(fd int) error { return unix.Shutdown(fd, unix.SHUT_WR) }) == nil
}

// tcpAllAcked reports whether the peer acknowledged everything the TCP
// socket rc sent, FIN included, with nothing left unsent; ok is false when
// it cannot tell.
func tcpAllAcked(rc syscall.RawConn) (done, ok bool) {
	info, ok := tcpInfo(rc)
	if !ok {
		return false, false
	}
	return info.Unacked == 0 && info.Notsent_bytes == 0, true
}

// setNotSentLowat limits the bytes the TCP socket rc holds unsent to
// about n (TCP_NOTSENT_LOWAT; 0 restores the system's default). A socket
// that refuses keeps its queue: pacing still works, with more delay.
func setNotSentLowat(rc syscall.RawConn, n int) {
	_ = setTCPOption(rc, unix.TCP_NOTSENT_LOWAT, n)
}

// setRetransmitCap caps the retransmission timeout of the TCP socket rc
// at d (TCP_RTO_MAX_MS), and reports whether the kernel took it (Linux
// 6.15 and later; older ones keep their 120s).
func setRetransmitCap(rc syscall.RawConn, d time.Duration) bool {
	return setTCPOption(rc, unix.TCP_RTO_MAX_MS, int(d/time.Millisecond)) == nil
}

// setUserTimeout has the kernel give up on the TCP socket rc after
// retransmitting for d (TCP_USER_TIMEOUT; 0 restores its own bounds).
func setUserTimeout(rc syscall.RawConn, d time.Duration) {
	_ = setTCPOption(rc, unix.TCP_USER_TIMEOUT, int(d/time.Millisecond))
}

// kernelGiveUp is how long the kernel retransmits before it gives up on a
// connection whose retransmission timeout is not capped: its own model
// of the backoff (tcp_model_timeout) with net.ipv4.tcp_retries2 (15 where
// it cannot be read: about 15 minutes).
var kernelGiveUp = sync.OnceValue(func() time.Duration {
	retries := 15
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_retries2"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n >= 0 {
			retries = n
		}
	}
	return backoffModel(retries)
})

// backoffModel returns the time the kernel's model gives retries
// retransmissions: timeouts from 200ms, doubling up to 120s.
func backoffModel(retries int) time.Duration {
	const first, most = 200 * time.Millisecond, maxRetransmitCap
	doublings := bits.Len(uint(most/first)) - 1
	if retries <= doublings {
		return time.Duration(2<<retries-1) * first
	}
	return time.Duration(2<<doublings-1)*first + time.Duration(retries-doublings)*most
}

// tcpSendState returns, from the TCP socket rc's TCP_INFO, the bytes the
// peer acknowledged, and whether the socket is recovering from loss: it
// has data in flight that the kernel retransmits (timeouts, backoff, or
// the loss state of congestion control). A peer that merely does not read
// acknowledges everything and closes its window: no data in flight.
func tcpSendState(rc syscall.RawConn) (acked uint64, recovering, ok bool) {
	info, ok := tcpInfo(rc)
	if !ok {
		return 0, false, false
	}
	const caLoss = 4 // TCP_CA_Loss
	return info.Bytes_acked, info.Unacked > 0 && (info.Retransmits > 0 || info.Backoff > 0 || info.Ca_state == caLoss), true
}
