package mux

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// FuzzSession feeds arbitrary bytes to a server session as its peer's
// side of the connection. The session must neither panic nor hang: it
// ends, at the latest when the input does, and so do all its goroutines
// and the streams' users. Seeds are in testdata/fuzz/FuzzSession.
func FuzzSession(f *testing.F) {
	f.Fuzz(func(t *testing.T, input []byte) {
		c1, c2 := net.Pipe()
		s, err := Server(c1, quiet(Config{
			AcceptBacklog:      4,
			MaxIncomingStreams: 8,
			MaxFrame:           1 << 10,
			WriteTimeout:       time.Second,
		}))
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { // the peer reads everything the session writes
			defer wg.Done()
			_, _ = io.Copy(io.Discard, c2)
		}()
		go func() { // accept streams and echo them
			defer wg.Done()
			for {
				st, err := s.AcceptStream(context.Background())
				if err != nil {
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer st.Close()
					buf := make([]byte, 512)
					for {
						n, err := st.Read(buf)
						if err != nil {
							return
						}
						if _, err := st.Write(buf[:n]); err != nil {
							return
						}
					}
				}()
			}
		}()
		_ = c2.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = c2.Write(input)
		_ = c2.Close()

		select {
		case <-s.CloseChan():
		case <-time.After(5 * time.Second):
			t.Fatal("session did not end after the input did")
		}
		s.Close()
		done := make(chan struct{})
		go func() {
			wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("stream users did not end")
		}
	})
}
