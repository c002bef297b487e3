package legacy

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// relay forwards client→server through f, which may tamper with the bytes
// or end the stream; server→client is copied as is.
func relay(t *testing.T, server string, tamper func(total int64, b []byte) (out []byte, end string)) string {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				s, err := net.Dial("tcp4", server)
				if err != nil {
					abort(c)
					return
				}
				go func() {
					if _, err := io.Copy(c, s); err != nil {
						abort(c)
						return
					}
					_ = c.(*net.TCPConn).CloseWrite()
				}()
				buf := make([]byte, 4096)
				var total int64
				for {
					n, err := c.Read(buf)
					if n > 0 {
						out, end := tamper(total, buf[:n])
						total += int64(n)
						switch end {
						case "fin":
							_ = s.(*net.TCPConn).CloseWrite()
							return
						case "rst":
							abort(s)
							abort(c)
							return
						}
						if _, err := s.Write(out); err != nil {
							return
						}
					}
					if err != nil {
						_ = s.(*net.TCPConn).CloseWrite()
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func startServer(t *testing.T) (*Server, string) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	s := &Server{Host: "srv", Bound: 10 * time.Second, Out: &Collector{}}
	s.Serve(ln)
	t.Cleanup(func() { ln.Close(); s.Wait(5 * time.Second) })
	return s, ln.Addr().String()
}

var nextID atomic.Uint64

func run(t *testing.T, addr string, mode Mode) Record {
	c, err := net.Dial("tcp4", addr)
	require.NoError(t, err)
	id := nextID.Add(1)
	return RunClient(c, ClientSpec{ID: id, Mode: mode, Frames: 50, MinSize: 1, MaxSize: 20000, Host: "cli", Path: "direct", Bound: 10 * time.Second, Seed: id})
}

func serverRecord(t *testing.T, s *Server, id uint64) Record {
	var rec Record
	require.Eventually(t, func() bool {
		for _, r := range s.Out.Records() {
			if r.ID == id {
				rec = r
				return true
			}
		}
		return false
	}, 5*time.Second, 10*time.Millisecond)
	return rec
}

func TestCleanConnections(t *testing.T) {
	s, addr := startServer(t)
	for _, mode := range []Mode{Echo, Sink} {
		rec := run(t, addr, mode)
		require.Equal(t, OK, rec.Outcome, rec.String())
		assert.Equal(t, rec.BytesSent, rec.BytesVerified)
		assert.Equal(t, 50, rec.FramesVerified)
		assert.Equal(t, "srv", rec.Peer)
		srec := serverRecord(t, s, rec.ID)
		assert.Equal(t, OK, srec.Outcome, srec.String())
		assert.Equal(t, rec.BytesSent, srec.BytesVerified)
		assert.Equal(t, "cli", srec.Peer)
	}
}

func TestCorruptionIsDetected(t *testing.T) {
	s, addr := startServer(t)
	addr = relay(t, addr, func(total int64, b []byte) ([]byte, string) {
		const at = 100_000
		if total <= at && at < total+int64(len(b)) {
			b[at-total] ^= 0x40
		}
		return b, ""
	})
	for _, mode := range []Mode{Echo, Sink} {
		rec := run(t, addr, mode)
		assert.NotEqual(t, OK, rec.Outcome, rec.String())
		srec := serverRecord(t, s, rec.ID)
		assert.Equal(t, Corrupt, srec.Outcome, srec.String())
	}
}

func TestTruncationAndResetAreDetected(t *testing.T) {
	for _, end := range []string{"fin", "rst"} {
		s, addr := startServer(t)
		addr = relay(t, addr, func(total int64, b []byte) ([]byte, string) {
			if total > 50_000 {
				return nil, end
			}
			return b, ""
		})
		for _, mode := range []Mode{Echo, Sink} {
			rec := run(t, addr, mode)
			srec := serverRecord(t, s, rec.ID)
			if end == "fin" {
				// The server sees a clean end too early and resets; the
				// client sees that reset.
				assert.Equal(t, ShortEOF, srec.Outcome, srec.String())
				assert.Contains(t, []Outcome{Reset, ShortEOF}, rec.Outcome, rec.String())
			} else {
				assert.Equal(t, Reset, srec.Outcome, srec.String())
				assert.Equal(t, Reset, rec.Outcome, rec.String())
			}
		}
	}
}

func TestClassify(t *testing.T) {
	assert.Equal(t, OK, Classify(nil))
	assert.Equal(t, ShortEOF, Classify(io.ErrUnexpectedEOF))
	c, err := net.Dial("tcp4", "127.0.0.1:1")
	if err == nil {
		c.Close()
		t.Skip("something listens on port 1")
	}
	assert.Equal(t, Refused, Classify(err))
}
