package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	a, err := net.Dial("tcp4", ln.Addr().String())
	require.NoError(t, err)
	b := <-accepted
	require.NotNil(t, b)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

func TestBufferSizing(t *testing.T) {
	var b buffer
	require.Len(t, b.get(), smallBuf)
	b.sized(100, smallBuf) // a small message: stay small
	require.NotNil(t, b.p)
	require.Len(t, b.get(), smallBuf)
	b.sized(smallBuf, smallBuf) // filled: large from now on
	require.Nil(t, b.p, "the small buffer goes back at once")
	require.Len(t, b.get(), largeBuf)
	b.sized(64<<10, largeBuf) // bulk: stay large
	require.Len(t, b.get(), largeBuf)
	b.sized(10, largeBuf) // back to small messages
	require.Nil(t, b.p)
	require.Len(t, b.get(), smallBuf)
	b.release()
	require.Nil(t, b.p)
	b.release() // idempotent
}

func TestReaderKinds(t *testing.T) {
	a, _ := tcpPair(t)
	assert.IsType(t, &rawReader{}, newReader(a))
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	assert.IsType(t, &plainReader{}, newReader(pipeHalf{p1}))
}

// pipeHalf gives a net.Pipe end the methods of a netconn.Conn.
type pipeHalf struct{ net.Conn }

func (p pipeHalf) CloseWrite() error   { return p.Close() }
func (p pipeHalf) SetLinger(int) error { return nil }

// tcpStream is a TCP connection in a stream's place: it cannot splice, so
// pipe copies into it.
type tcpStream struct{ *net.TCPConn }

func (s tcpStream) Reset() error                                { resetLegacy(s.TCPConn); return nil }
func (tcpStream) AwaitReset() error                             { return nil }
func (tcpStream) SpliceFrom(channels.SpliceConn) (int64, error) { return 0, channels.ErrNoSplice }

// TestRawReaderReleasesWhenDrained checks that a direction waiting for
// data holds no buffer, and that data, EOF and errors come through.
func TestRawReaderReleasesWhenDrained(t *testing.T) {
	a, b := tcpPair(t)
	r := newReader(b)
	var buf buffer
	_, err := a.Write([]byte("hello"))
	require.NoError(t, err)
	n, err := r.read(&buf)
	require.NoError(t, err)
	require.Equal(t, "hello", string((*buf.p)[:n]))

	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := r.read(&buf)
		done <- result{n, err}
	}()
	// The read finds nothing, gives its buffer back and waits; only then
	// does the data arrive.
	time.Sleep(50 * time.Millisecond)
	_, err = a.Write([]byte("world"))
	require.NoError(t, err)
	res := <-done
	require.NoError(t, res.err)
	require.Equal(t, "world", string((*buf.p)[:res.n]))

	require.NoError(t, a.CloseWrite())
	n, err = r.read(&buf)
	assert.Equal(t, 0, n)
	assert.ErrorIs(t, err, io.EOF)

	require.NoError(t, b.Close())
	_, err = r.read(&buf)
	assert.ErrorIs(t, err, net.ErrClosed)
}

func TestRawReaderDeadline(t *testing.T) {
	_, b := tcpPair(t)
	require.NoError(t, b.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	var buf buffer
	_, err := newReader(b).read(&buf)
	require.Error(t, err)
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "want a timeout, got %v", err)
	assert.Nil(t, buf.p, "no buffer held after a timeout")
}

// TestPipeTCP copies bulk data and then small messages through pipe
// between two TCP connections and checks bytes, counter and half-close.
func TestPipeTCP(t *testing.T) {
	clientA, proxyA := tcpPair(t) // client → proxy
	proxyB, serverB := tcpPair(t) // proxy → server
	var counter, activity atomic.Int64
	res := make(chan pipeResult, 1)
	go func() { res <- pipe(tcpStream{proxyB}, proxyA, &counter, &activity, new(sendWatch)) }()

	data := make([]byte, 3<<20+123)
	_, _ = rand.Read(data)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(serverB)
		got <- b
	}()
	_, err := clientA.Write(data)
	require.NoError(t, err)
	for i := range 100 { // small messages after bulk: back to small buffers
		msg := bytes.Repeat([]byte{byte(i)}, 1+i)
		_, err := clientA.Write(msg)
		require.NoError(t, err)
		data = append(data, msg...)
	}
	require.NoError(t, clientA.CloseWrite())
	r := <-res
	require.NoError(t, r.err, "clean EOF is forwarded as FIN")
	assert.Equal(t, int64(len(data)), r.n)
	assert.Equal(t, int64(len(data)), counter.Load())
	assert.Equal(t, counter.Load(), activity.Load(), "activity counts the same bytes")
	assert.True(t, bytes.Equal(data, <-got), "bytes differ")
}
