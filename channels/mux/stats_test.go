package mux

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStats: the byte counters of both sessions agree with the stream data
// sent each way, over a socket (writev, splice) and over a pipe (copied
// writes), and the keepalive's first ping measures the round-trip time.
func TestStats(t *testing.T) {
	for _, tc := range []struct {
		name string
		pair func(testing.TB, Config) (*Session, *Session)
	}{{"tcp", tcpPair}, {"unix", unixPair}, {"pipe", pipePair}} {
		t.Run(tc.name, func(t *testing.T) {
			cli, srv := tc.pair(t, Config{})
			require.Eventually(t, func() bool { return cli.RTT() > 0 && srv.RTT() > 0 },
				10*time.Second, time.Millisecond, "the first keepalive ping is answered")

			a, b := openPair(t, cli, srv) // one byte, cli → srv
			up := randomBytes(t, 3<<20+17)
			down := randomBytes(t, 100<<10)
			done := make(chan []byte)
			go func() {
				got, _ := io.ReadAll(b)
				done <- got
			}()
			_, err := io.Copy(a, bytes.NewReader(up))
			require.NoError(t, err)
			require.NoError(t, a.CloseWrite())
			require.Equal(t, len(up), len((<-done)))
			_, err = b.Write(down)
			require.NoError(t, err)
			_, err = io.ReadFull(a, make([]byte, len(down)))
			require.NoError(t, err)

			wantUp, wantDown := uint64(1+len(up)), uint64(len(down))
			require.Eventually(t, func() bool {
				c, s := cli.Stats(), srv.Stats()
				return c.BytesSent == wantUp && s.BytesReceived == wantUp &&
					s.BytesSent == wantDown && c.BytesReceived == wantDown
			}, 10*time.Second, time.Millisecond, "client %+v server %+v", cli.Stats(), srv.Stats())
			st := cli.Stats()
			assert.Positive(t, st.RTT)
			assert.Equal(t, 1, st.Streams, "the stream is half-closed one way only")
		})
	}
}
