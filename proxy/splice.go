package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// halfConn is a connection whose two directions can be ended separately:
// a legacy TCP connection or a channels.Stream.
type halfConn interface {
	net.Conn
	// CloseWrite sends FIN: the peer reads EOF, we keep reading.
	CloseWrite() error
}

// abort ends c with a reset: RST for TCP, a stream reset for streams.
func abort(c net.Conn) {
	switch c := c.(type) {
	case interface{ Reset() error }: // channels.Stream
		_ = c.Reset()
	case interface {
		SetLinger(int) error
		Close() error
	}: // *net.TCPConn and netstack conns
		_ = c.SetLinger(0)
		_ = c.Close()
	default:
		_ = c.Close()
	}
}

// Copy buffers. A connection starts with a small buffer so that thousands
// of idle connections cost little, and moves to a large one the first time
// a read fills the small one (bulk transfer).
const (
	smallBuf = 4 << 10
	largeBuf = 64 << 10
)

var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}
	largePool = sync.Pool{New: func() any { b := make([]byte, largeBuf); return &b }}
)

// pipeResult says how one direction of a splice ended.
type pipeResult struct {
	n   int64
	err error // nil: clean EOF, forwarded as FIN
}

// pipe copies src to dst until EOF (then half-closes dst) or an error. It
// counts bytes into *counter as they flow, so stats are live.
func pipe(dst, src halfConn, counter *atomic.Int64) pipeResult {
	bp := smallPool.Get().(*[]byte)
	large := false
	defer func() {
		if large {
			largePool.Put(bp)
		} else {
			smallPool.Put(bp)
		}
	}()
	var total int64
	for {
		buf := *bp
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			total += int64(nw)
			counter.Add(int64(nw))
			if werr == nil && nw != nr {
				werr = io.ErrShortWrite
			}
			if werr != nil {
				return pipeResult{total, werr}
			}
			if !large && nr == len(buf) {
				smallPool.Put(bp)
				bp, large = largePool.Get().(*[]byte), true
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return pipeResult{total, dst.CloseWrite()}
			}
			return pipeResult{total, rerr}
		}
	}
}

// spliceStats receives live byte counts of a splice.
type spliceStats struct {
	legacyToStream *atomic.Int64
	streamToLegacy *atomic.Int64
}

// splice joins a legacy TCP connection and a stream with TCP semantics in
// both directions: EOF on one side becomes FIN (CloseWrite) on the other
// while the reverse direction keeps flowing; any other error on either side
// (RST, stream reset, transport loss) resets both. It returns when both
// directions have ended and both connections are closed. Back-pressure is
// end to end: each direction reads only after the previous write finished.
// The returned error is nil after two clean EOFs.
func splice(legacy, stream halfConn, st spliceStats) error {
	var (
		abortOnce sync.Once
		wg        sync.WaitGroup
		up        pipeResult
	)
	fail := func() {
		abortOnce.Do(func() {
			abort(stream)
			abort(legacy)
		})
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		up = pipe(stream, legacy, st.legacyToStream)
		if up.err != nil {
			fail()
		}
	}()
	down := pipe(legacy, stream, st.streamToLegacy)
	if down.err != nil {
		fail()
	}
	wg.Wait()
	_ = legacy.Close()
	_ = stream.Close()
	return errors.Join(up.err, down.err)
}
