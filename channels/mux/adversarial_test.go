//go:build linux

package mux

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// The adversarial suite: many streams at once with random sizes and
// random write chunking, through every send path (Write, SpliceFrom) and
// receive path (Read, WriteTo into a plain writer and into a socket), over
// net.Pipe, TCP and Unix sockets; resets from every end and the sessions'
// deaths at random moments; slow links; floods of frames from a hostile
// peer; exhausted pipe and descriptor budgets. Every byte is verified, and
// every end must keep the contract: a clean end (io.EOF from Read, nil
// from WriteTo) only after every byte; any other end an error matching
// ErrStreamReset, or the caller's own doing (Close, a socket it aborted).
// After every round, no goroutine, pipe or descriptor is left over.
//
// The size fits CI (about a minute under -race); TCPPROXY_ADVERSARIAL=long
// (ten times as much) or =N (N times) runs more. Randomness is seeded:
// TCPPROXY_ADVERSARIAL_SEED=S replays a run, whose seed a failure prints.

// advScale returns the suite's size factor.
func advScale(t *testing.T) int {
	switch v := os.Getenv("TCPPROXY_ADVERSARIAL"); v {
	case "":
		return 1
	case "long":
		return 10
	default:
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "TCPPROXY_ADVERSARIAL is long or a number")
		require.Positive(t, n, "TCPPROXY_ADVERSARIAL")
		return n
	}
}

// advRand returns the test's random source, seeded from
// TCPPROXY_ADVERSARIAL_SEED or the clock, and the test's name; a failed
// test prints how to replay it.
func advRand(t *testing.T) *rand.Rand {
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("TCPPROXY_ADVERSARIAL_SEED"); v != "" {
		var err error
		seed, err = strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, "TCPPROXY_ADVERSARIAL_SEED")
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("replay: TCPPROXY_ADVERSARIAL_SEED=%d TCPPROXY_ADVERSARIAL=%s go test -race -run '^%s$' ./channels/mux",
				seed, os.Getenv("TCPPROXY_ADVERSARIAL"), strings.Split(t.Name(), "/")[0])
		}
	})
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}

// advTransport is a kind of connection under the sessions.
type advTransport struct {
	name   string
	conns  func(t testing.TB) (net.Conn, net.Conn)
	socket bool // a kernel socket: the splice paths work
}

var advTransports = []advTransport{
	{"pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }, false},
	{"tcp", tcpConns, true},
	{"unix", unixConns, true},
}

// openFDs counts the process's open descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents) - 1 // the directory's own
}

// leakCheck records the goroutines, pipes and descriptors before a round
// and checks, after it, that the round left none of its own.
func leakCheck(t *testing.T) func() {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	pipes, fds := openPipes(t), openFDs(t)
	return func() {
		t.Helper()
		require.NoError(t, goleak.Find(ignore), "goroutines left by the round")
		require.Equal(t, pipes, openPipes(t), "pipes left open by the round")
		require.Eventually(t, func() bool { return openFDs(t) <= fds }, 5*time.Second, 10*time.Millisecond,
			"descriptors left open by the round: %d, were %d", openFDs(t), fds)
	}
}

// randomSize draws a direction's size: often nothing or a few bytes,
// sometimes kilobytes, now and then megabytes.
func randomSize(rng *rand.Rand, scale int) int64 {
	switch p := rng.IntN(100); {
	case p < 10:
		return 0
	case p < 40:
		return rng.Int64N(1 << 10)
	case p < 75:
		return rng.Int64N(64 << 10)
	case p < 95:
		return rng.Int64N(1 << 20)
	default:
		return rng.Int64N(int64(2+scale) << 20)
	}
}

// randomChunk draws the size of one write or read: a byte now and then,
// often small, up to 256 KiB.
func randomChunk(rng *rand.Rand, left int64) int {
	var n int
	switch p := rng.IntN(10); {
	case p < 2:
		n = 1 + rng.IntN(16)
	case p < 6:
		n = 1 + rng.IntN(4<<10)
	default:
		n = 1 + rng.IntN(256<<10)
	}
	return int(min(int64(n), max(left, 1)))
}

// verifier checks received bytes against the pattern the sender wrote, a
// seeded pseudo-random stream, without holding a copy of it. A trigger
// runs once when the count passes at.
type verifier struct {
	mu      sync.Mutex
	want    *rand.ChaCha8
	size, n int64
	buf     []byte
	bad     error
	at      int64
	trigger func()
}

func newVerifier(seed uint64, size int64) *verifier {
	return &verifier{want: rand.NewChaCha8(seed32(seed)), size: size, at: -1}
}

func seed32(s uint64) [32]byte {
	var b [32]byte
	for i := range 4 {
		b[8*i] = byte(s >> (8 * i))
		b[8*i+1] = byte(s >> (8*i + 32))
	}
	b[31] = 0x5a
	return b
}

func (v *verifier) Write(b []byte) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.bad == nil {
		if v.n+int64(len(b)) > v.size {
			v.bad = fmt.Errorf("%d bytes past the %d sent", v.n+int64(len(b))-v.size, v.size)
		} else {
			if cap(v.buf) < len(b) {
				v.buf = make([]byte, len(b))
			}
			want := v.buf[:len(b)]
			_, _ = v.want.Read(want)
			for i := range b {
				if b[i] != want[i] {
					v.bad = fmt.Errorf("byte %d is %#x, sent %#x", v.n+int64(i), b[i], want[i])
					break
				}
			}
		}
	}
	v.n += int64(len(b))
	if v.trigger != nil && v.n >= v.at {
		go v.trigger()
		v.trigger = nil
	}
	return len(b), nil
}

// arm makes trigger run once the count reaches at (at once if it has).
func (v *verifier) arm(at int64, trigger func()) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.n >= at {
		go trigger()
		return
	}
	v.at, v.trigger = at, trigger
}

func (v *verifier) result() (int64, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.n, v.bad
}

// pattern writes the bytes that a verifier with the same seed expects.
type pattern struct{ gen *rand.ChaCha8 }

func newPattern(seed uint64) *pattern { return &pattern{gen: rand.NewChaCha8(seed32(seed))} }

func (p *pattern) fill(b []byte) { _, _ = p.gen.Read(b) }

// Send and receive paths.
const (
	sendWrite  = "write"
	sendSplice = "splice" // from a socket, by SpliceFrom (falls back to Write)

	recvRead     = "read"
	recvWriteTo  = "writeto"        // into a plain writer
	recvToSocket = "writeto-socket" // into a socket (spliced)
)

// dirPlan is one direction of a stream.
type dirPlan struct {
	size       int64
	seed       uint64
	send, recv string
}

func randomDir(rng *rand.Rand, scale int, socket bool) dirPlan {
	d := dirPlan{size: randomSize(rng, scale), seed: rng.Uint64(), send: sendWrite, recv: recvRead}
	if rng.IntN(2) == 0 {
		d.send = sendSplice // over a pipe session, SpliceFrom refuses and it copies
	}
	switch rng.IntN(3) {
	case 1:
		d.recv = recvWriteTo
	case 2:
		d.recv = recvToSocket
	}
	if !socket && d.recv == recvToSocket && rng.IntN(2) == 0 {
		d.recv = recvWriteTo
	}
	return d
}

// recvResult is how the receiving end of a direction ended.
type recvResult struct {
	err      error // nil: a clean end
	received int64 // bytes verified, in order
	corrupt  error
}

// Chaos actions on one stream, at a random point of its first direction.
const (
	chaosResetA    = "reset opener"
	chaosResetB    = "reset acceptor"
	chaosCloseA    = "close opener"
	chaosCloseB    = "close acceptor"
	chaosAbortDest = "abort destination socket"
	chaosAbortSrc  = "abort source socket"
)

var chaosActions = []string{chaosResetA, chaosResetB, chaosCloseA, chaosCloseB, chaosAbortDest, chaosAbortSrc}

// streamPlan is one stream of a round: its directions, opener→acceptor
// then acceptor→opener, its chaos, and what happened.
type streamPlan struct {
	idx   int
	dirs  [2]dirPlan
	chaos string
	at    int64 // offset of dirs[0] where the chaos strikes

	mu       sync.Mutex
	ends     [2]*Stream   // opener's, acceptor's
	src, dst *net.TCPConn // dirs[0]'s legacy sockets, if any
	struck   string       // the chaos done, if it was

	sendErr  [2]error
	recv     [2]recvResult
	accepted atomic.Bool // the acceptor ran
}

// strike does p's chaos.
func (p *streamPlan) strike() {
	p.mu.Lock()
	defer p.mu.Unlock()
	action := p.chaos
	switch {
	case action == chaosAbortDest && p.dst == nil:
		action = chaosResetB
	case action == chaosAbortSrc && p.src == nil:
		action = chaosResetA
	}
	p.struck = action
	switch action {
	case chaosResetA:
		p.ends[0].Reset()
	case chaosResetB:
		p.ends[1].Reset()
	case chaosCloseA:
		p.ends[0].Close()
	case chaosCloseB:
		p.ends[1].Close()
	case chaosAbortDest:
		abortSocket(p.dst)
	case chaosAbortSrc:
		abortSocket(p.src)
	}
}

func (p *streamPlan) setSocket(d int, src bool, c *net.TCPConn) {
	if d != 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if src {
		p.src = c
	} else {
		p.dst = c
	}
}

// abortSocket resets a legacy program's connection (RST).
func abortSocket(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// sockPair returns both ends of a TCP connection, the proxy's splicing
// one and the legacy program's, for the caller to close.
func sockPair(t testing.TB) (*sock, *net.TCPConn) {
	c1, c2 := tcpConns(t)
	return &sock{TCPConn: c1.(*net.TCPConn)}, c2.(*net.TCPConn)
}

// roundConfig sizes one round.
type roundConfig struct {
	streams int
	chaos   bool // resets, closes and aborts on a third of the streams
	// session, if set, strikes a session once the streams have moved half
	// their bytes: "kill" closes the connection under the client,
	// "close" closes the server session.
	session string
	cfg     Config
	// throttle, if set, paces the server session's reads (bytes/s).
	throttle int
	// maxSize, if set, bounds the directions' sizes.
	maxSize int64
	// buffers, if set, is the socket buffers' size: small ones put the
	// backlog of a throttled session in the sender, as a slow link does.
	buffers int
}

// runRound runs a round over tr: streams opened from both sides, each
// moving its two directions by their paths, with the round's chaos; then
// it checks every direction's outcome and that nothing leaked.
func runRound(t *testing.T, rng *rand.Rand, tr advTransport, rc roundConfig, scale int) {
	t.Helper()
	leaks := leakCheck(t)
	c1, c2 := tr.conns(t)
	if rc.buffers > 0 && tr.socket {
		smallBuffers(t, rc.buffers, c1, c2)
	}
	if rc.throttle > 0 {
		c2 = throttle(c2, rc.throttle, 16<<10)
	}
	cfg := quiet(rc.cfg)
	cfg.AcceptBacklog = max(cfg.AcceptBacklog, rc.streams)
	cli, err := Client(c1, cfg)
	require.NoError(t, err)
	srv, err := Server(c2, cfg)
	require.NoError(t, err)

	plans := make([]*streamPlan, rc.streams)
	var total int64
	for i := range plans {
		p := &streamPlan{idx: i}
		for d := range p.dirs {
			p.dirs[d] = randomDir(rng, scale, tr.socket)
			if rc.maxSize > 0 {
				p.dirs[d].size = min(p.dirs[d].size, rc.maxSize)
			}
			total += p.dirs[d].size
		}
		if rc.chaos && rng.IntN(3) == 0 {
			p.chaos = chaosActions[rng.IntN(len(chaosActions))]
			p.at = rng.Int64N(p.dirs[0].size + 1)
		}
		plans[i] = p
	}
	openers := make([]bool, len(plans)) // true: the server opens it
	for i := range openers {
		openers[i] = rng.IntN(3) == 0
	}

	// The session event, once half the bytes moved.
	var struck atomic.Bool
	var moved atomic.Int64
	var strikeOnce sync.Once
	progress := func(n int64) {
		if rc.session == "" || moved.Add(n) < total/2 {
			return
		}
		strikeOnce.Do(func() {
			struck.Store(true)
			go func() {
				if rc.session == "kill" {
					_ = c1.Close()
				} else {
					_ = srv.Close()
				}
			}()
		})
	}

	// Every stream has four parts, two senders and two receivers; the
	// round is over when all have ended.
	parts := atomic.Int64{}
	allOver := make(chan struct{})
	partDone := func() {
		if parts.Add(1) == int64(4*len(plans)) {
			close(allOver)
		}
	}
	sessionsOver := make(chan struct{})
	var wg sync.WaitGroup
	for _, s := range []*Session{cli, srv} {
		wg.Go(func() {
			for {
				st, err := s.AcceptStream(testCtx(t))
				if err != nil {
					return
				}
				wg.Go(func() { runAcceptor(t, st, plans, progress, partDone, &wg) })
			}
		})
	}
	for i, p := range plans {
		opener := cli
		if openers[i] {
			opener = srv
		}
		seed := rng.Uint64()
		wg.Go(func() { runOpener(t, seed, opener, p, progress, partDone, &wg) })
	}

	timeout := time.NewTimer(2 * time.Minute)
	defer timeout.Stop()
	select {
	case <-allOver:
	case <-cli.CloseChan():
	case <-srv.CloseChan():
	case <-timeout.C:
		t.Errorf("round hung: %s", roundState(plans))
	}
	died := rc.session == "" && (cli.IsClosed() || srv.IsClosed())
	if died {
		t.Errorf("a session ended during the round: client %v, server %v", cli.Err(), srv.Err())
	}
	cli.Close()
	srv.Close()
	close(sessionsOver)
	wg.Wait()

	var received int64
	for _, p := range plans {
		checkPlan(t, p, struck.Load() || died, tr)
		received += p.recv[0].received + p.recv[1].received
	}
	t.Logf("%s round: %d streams, %d of %d bytes verified, session event %q struck %v", tr.name, len(plans), received, total, rc.session, struck.Load())
	leaks()
}

// roundState lists the streams not yet over, for a hung round.
func roundState(plans []*streamPlan) string {
	var b strings.Builder
	for _, p := range plans {
		p.mu.Lock()
		fmt.Fprintf(&b, "\n#%d %+v chaos %q struck %q accepted %v", p.idx, p.dirs, p.chaos, p.struck, p.accepted.Load())
		p.mu.Unlock()
	}
	return b.String()
}

// runOpener opens p's stream on s, writes its header (the plan's index)
// and runs the opener's ends: the sender of dirs[0] and the receiver of
// dirs[1].
func runOpener(t *testing.T, seed uint64, s *Session, p *streamPlan, progress func(int64), partDone func(), wg *sync.WaitGroup) {
	st, err := s.OpenStream(testCtx(t))
	if err == nil {
		p.mu.Lock()
		p.ends[0] = st
		p.mu.Unlock()
		_, err = st.Write([]byte{byte(p.idx >> 24), byte(p.idx >> 16), byte(p.idx >> 8), byte(p.idx)})
	}
	if err != nil {
		// The session ended before the stream got going.
		p.sendErr[0], p.recv[1] = err, recvResult{err: err}
		partDone()
		partDone()
		return
	}
	wg.Go(func() {
		p.sendErr[0] = send(t, rand.New(rand.NewPCG(seed, 0)), st, p, 0)
		partDone()
	})
	p.recv[1] = receive(t, rand.New(rand.NewPCG(seed, 1)), st, p, 1, progress)
	partDone()
}

// runAcceptor reads an accepted stream's header and runs the acceptor's
// ends: the receiver of dirs[0] and the sender of dirs[1].
func runAcceptor(t *testing.T, st *Stream, plans []*streamPlan, progress func(int64), partDone func(), wg *sync.WaitGroup) {
	var hdr [4]byte
	if _, err := io.ReadFull(st, hdr[:]); err != nil {
		// Only the session's end comes before the header (chaos strikes
		// later): the opener reports it.
		st.Reset()
		return
	}
	idx := int(hdr[0])<<24 | int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
	if idx >= len(plans) || plans[idx].accepted.Swap(true) {
		t.Errorf("stream %d: header names plan %d, unknown or taken", st.ID(), idx)
		st.Reset()
		return
	}
	p := plans[idx]
	p.mu.Lock()
	p.ends[1] = st
	p.mu.Unlock()
	seed := p.dirs[1].seed
	wg.Go(func() {
		p.sendErr[1] = send(t, rand.New(rand.NewPCG(seed, 2)), st, p, 1)
		partDone()
	})
	p.recv[0] = receive(t, rand.New(rand.NewPCG(seed, 3)), st, p, 0, progress)
	partDone()
}

// send writes direction d of p to st by its path, half-closes, and
// resets st if anything failed (as a proxy does), so that the receiver
// is not left waiting.
func send(t testing.TB, rng *rand.Rand, st *Stream, p *streamPlan, d int) (err error) {
	dp := p.dirs[d]
	defer func() {
		if err != nil {
			st.Reset()
		}
	}()
	pat := newPattern(dp.seed)
	if dp.send == sendWrite {
		buf := make([]byte, 256<<10)
		for left := dp.size; left > 0; {
			n := randomChunk(rng, left)
			pat.fill(buf[:n])
			if _, err := st.Write(buf[:n]); err != nil {
				return err
			}
			left -= int64(n)
		}
		return st.CloseWrite()
	}
	// From a legacy program's socket, as the proxy forwards it.
	up, a := sockPair(t)
	p.setSocket(d, true, a)
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		buf := make([]byte, 256<<10)
		for left := dp.size; left > 0; {
			n := randomChunk(rng, left)
			pat.fill(buf[:n])
			if _, err := a.Write(buf[:n]); err != nil {
				return
			}
			left -= int64(n)
		}
		_ = a.CloseWrite()
	}()
	err = pump(st, up)
	up.Close() // ends the feeder's writes if the pump stopped early
	<-fed
	a.Close()
	return err
}

// progressWriter counts what goes through it into the round's progress.
type progressWriter struct {
	w        io.Writer
	progress func(int64)
}

func (w progressWriter) Write(b []byte) (int, error) {
	n, err := w.w.Write(b)
	w.progress(int64(n))
	return n, err
}

// receive reads direction d of p from st by its path, verifying every
// byte, and arms p's chaos on dirs[0].
func receive(t testing.TB, rng *rand.Rand, st *Stream, p *streamPlan, d int, progress func(int64)) recvResult {
	dp := p.dirs[d]
	v := newVerifier(dp.seed, dp.size)
	if d == 0 && p.chaos != "" {
		v.arm(p.at, p.strike)
	}
	w := progressWriter{v, progress}
	var err error
	switch dp.recv {
	case recvRead:
		buf := make([]byte, 256<<10)
		for {
			var n int
			n, err = st.Read(buf[:randomChunk(rng, 256<<10)])
			_, _ = w.Write(buf[:n])
			if err != nil {
				break
			}
		}
		if err == io.EOF {
			err = nil
		}
	case recvWriteTo:
		var n int64
		n, err = st.WriteTo(w)
		if got, _ := v.result(); n != got {
			err = errors.Join(err, fmt.Errorf("WriteTo returned %d, wrote %d", n, got))
		}
	case recvToSocket:
		// Into a legacy program's socket, as the proxy delivers.
		down, b := sockPair(t)
		p.setSocket(d, false, b)
		copied := make(chan error, 1)
		go func() {
			_, err := io.Copy(w, b)
			copied <- err
		}()
		_, err = st.WriteTo(down)
		if err == nil {
			err = down.CloseWrite()
		}
		if err != nil {
			st.Reset() // as the proxy does
			abortSocket(down.TCPConn)
		}
		cerr := <-copied
		if err == nil && cerr != nil {
			err = fmt.Errorf("the legacy program's read: %w", cerr)
		}
		down.Close()
		b.Close()
		p.mu.Lock()
		if d == 0 && p.struck == chaosAbortDest && err != nil {
			err = fmt.Errorf("%w: %v", errAbortedByTest, err)
		}
		p.mu.Unlock()
	}
	got, bad := v.result()
	return recvResult{err: err, received: got, corrupt: bad}
}

// checkPlan checks how p's directions ended, against the contract.
func checkPlan(t *testing.T, p *streamPlan, sessionHit bool, tr advTransport) {
	t.Helper()
	p.mu.Lock()
	struck := p.struck
	p.mu.Unlock()
	for d, dp := range p.dirs {
		r := p.recv[d]
		name := fmt.Sprintf("%s stream #%d direction %d (%d bytes, %s → %s, chaos %q struck %q)", tr.name, p.idx, d, dp.size, dp.send, dp.recv, p.chaos, struck)
		if d == 0 && !p.accepted.Load() || d == 1 && p.ends[0] == nil {
			// Never accepted, or never opened: only the session's end
			// does that.
			if !sessionHit {
				t.Errorf("%s: never started, with both sessions alive", name)
			}
			continue
		}
		if r.corrupt != nil {
			t.Errorf("%s: CORRUPT: %v", name, r.corrupt)
		}
		// The sender's own Close ends its direction cleanly, early.
		closedBySender := d == 0 && struck == chaosCloseA || d == 1 && struck == chaosCloseB
		if r.err == nil && r.received != dp.size && !closedBySender {
			t.Errorf("%s: clean end after %d bytes of %d: a reset or a dead session passed for the end", name, r.received, dp.size)
		}
		if struck == "" && !sessionHit {
			if r.err != nil || p.sendErr[d] != nil {
				t.Errorf("%s: failed untouched: receiver %v, sender %v", name, r.err, p.sendErr[d])
			}
			continue
		}
		if r.err != nil && !expectedEnd(r.err, d == 0 && struck == chaosAbortDest) {
			t.Errorf("%s: receiver ended with %v, neither a reset nor its own doing", name, r.err)
		}
		if err := p.sendErr[d]; err != nil && !expectedEnd(err, d == 0 && struck == chaosAbortSrc) {
			t.Errorf("%s: sender ended with %v, neither a reset nor its own doing", name, err)
		}
	}
}

// errAbortedByTest marks the failure of a delivery whose legacy socket
// the chaos aborted.
var errAbortedByTest = errors.New("destination socket aborted by the test")

// expectedEnd says whether err is an end a stream's user may see after
// chaos: a reset (by either end, or the session's end), its own Close,
// or, if socket, its own legacy socket's failure.
func expectedEnd(err error, socket bool) bool {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return false
	case errors.Is(err, ErrStreamReset), errors.Is(err, net.ErrClosed):
		return true
	case socket:
		return errors.Is(err, errAbortedByTest) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
	}
	return false
}

// TestAdversarialIntegrity: many streams at once, in both directions,
// random sizes and chunking, every send and receive path, over each
// transport; every byte verified, every end clean.
func TestAdversarialIntegrity(t *testing.T) {
	scale, rng := advScale(t), advRand(t)
	for _, tr := range advTransports {
		t.Run(tr.name, func(t *testing.T) {
			for range 2 * scale {
				runRound(t, rng, tr, roundConfig{streams: 40}, scale)
			}
		})
	}
}

// TestAdversarialChaos: resets, closes and aborted sockets at random
// points of random streams, and the sessions' deaths mid-transfer: no
// truncated stream passes for a complete one, every other end is a reset
// or the user's own doing, and nothing hangs or leaks.
func TestAdversarialChaos(t *testing.T) {
	scale, rng := advScale(t), advRand(t)
	for _, tr := range advTransports {
		t.Run(tr.name, func(t *testing.T) {
			for range scale {
				for _, session := range []string{"", "kill", "close"} {
					runRound(t, rng, tr, roundConfig{streams: 40, chaos: true, session: session}, scale)
				}
			}
		})
	}
}

// TestAdversarialSlowLink: hundreds of streams through a session whose
// peer reads at 1 MB/s, with write and keepalive timeouts about as long as
// the backlog takes to cross: the session lives, and every byte arrives.
func TestAdversarialSlowLink(t *testing.T) {
	scale, rng := advScale(t), advRand(t)
	cfg := Config{WriteTimeout: 2 * time.Second, KeepAliveInterval: 100 * time.Millisecond, KeepAliveTimeout: 2 * time.Second}
	for _, tr := range advTransports {
		t.Run(tr.name, func(t *testing.T) {
			for range scale {
				runRound(t, rng, tr, roundConfig{streams: 200, cfg: cfg, throttle: 1 << 20, maxSize: 32 << 10, buffers: 64 << 10}, scale)
			}
		})
	}
}

// TestAdversarialFloods: a hostile peer floods the session with frames
// and never reads what the session answers. The answers the session
// queues stay bounded, so does its memory and its log, and it survives
// whatever does not break the protocol; a window overflow ends it
// cleanly, with GoAway.
func TestAdversarialFloods(t *testing.T) {
	scale := advScale(t)
	n := 100_000 * scale
	for _, tc := range []struct {
		name  string
		cfg   Config
		frame func(i int) []byte
		// after is a last frame, and breaks says the session must end
		// with a protocol error when it gets there.
		after  []byte
		breaks bool
	}{
		{name: "SYNs past the backlog", cfg: Config{AcceptBacklog: 1},
			frame: func(i int) []byte { return frameBytes(typeWindowUpdate, flagSYN, uint32(2*i+1), 0, nil) }},
		{name: "SYNs with data past the streams", cfg: Config{MaxIncomingStreams: 1},
			frame: func(i int) []byte { return frameBytes(typeData, flagSYN, uint32(2*i+1), 3, []byte("abc")) }},
		{name: "pings",
			frame: func(i int) []byte { return frameBytes(typePing, flagSYN, 0, uint32(i), nil) }},
		{name: "data for unknown streams",
			frame: func(i int) []byte { return frameBytes(typeData, 0, uint32(2*i+1), 4, []byte("junk")) }},
		{name: "resets and FINs for unknown streams",
			frame: func(i int) []byte { return frameBytes(typeWindowUpdate, flagRST|flagFIN, uint32(2*i+1), 0, nil) }},
		{name: "window updates, then an overflow",
			frame: func(i int) []byte {
				if i == 0 {
					return frameBytes(typeWindowUpdate, flagSYN, 1, 0, nil)
				}
				return frameBytes(typeWindowUpdate, 0, 1, 1, nil)
			},
			after: frameBytes(typeWindowUpdate, 0, 1, 1<<32-1, nil), breaks: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			c1, c2 := tcpConns(t)
			smallBuffers(t, 16<<10, c1, c2)
			logs := &countingHandler{}
			cfg := tc.cfg
			cfg.Logger = slog.New(logs)
			var frames []byte
			for i := range n {
				frames = append(frames, tc.frame(i)...)
			}
			frames = append(frames, tc.after...)
			before := heapInUse()
			s, err := Server(c1, cfg)
			require.NoError(t, err)
			k, peak := flood(t, s, c2, frames)
			grown := heapInUse() - before
			t.Logf("%d frames, %d bytes taken; peak queue %d frames; heap +%d KiB; %d log lines; %+v",
				n, k, peak, grown>>10, logs.n.Load(), s.LimitStats())
			require.LessOrEqual(t, peak, maxQueuedRefusals+maxQueuedPongs+16, "frames queued without bound")
			require.Less(t, grown, int64(16<<20), "memory grew with the flood")
			require.LessOrEqual(t, logs.n.Load(), int64(3), "log lines")
			if tc.breaks && k == len(frames) {
				select {
				case <-s.CloseChan():
				case <-testCtx(t).Done():
					t.Fatal("the overflow did not end the session")
				}
				require.ErrorIs(t, s.Err(), ErrProtocol)
			} else {
				require.False(t, s.IsClosed(), "session ended: %v", s.Err())
			}
			s.Close()
			c2.Close()
			leaks()
		})
	}
}

// TestAdversarialBudgets: transfers that want pipes when the process's
// pipe budget, or its descriptors, are exhausted copy instead, and
// complete.
func TestAdversarialBudgets(t *testing.T) {
	scale, rng := advScale(t), advRand(t)
	tcp := advTransports[1]
	t.Run("pipes", func(t *testing.T) {
		before := SpliceStats().PipeShortages
		limitPipes(t, 2)
		for range scale {
			runRound(t, rng, tcp, roundConfig{streams: 40}, scale)
		}
		require.Greater(t, SpliceStats().PipeShortages, before)
	})
	t.Run("descriptors", func(t *testing.T) {
		leaks := leakCheck(t)
		before := SpliceStats().PipeShortages
		const streams = 12
		cli, srv := tcpPair(t, Config{})
		type legs struct {
			sa, sb *Stream
			up     *sock
			a      *net.TCPConn
			down   *sock
			b      *net.TCPConn
		}
		var all []legs
		for range streams {
			l := legs{}
			l.sa, l.sb = openPair(t, cli, srv)
			l.up, l.a = sockPair(t)
			l.down, l.b = sockPair(t)
			all = append(all, l)
		}
		// No descriptor left: pipe(2) fails with EMFILE.
		idlePipes()
		var lim syscall.Rlimit
		require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim))
		low := lim
		low.Cur = uint64(openFDs(t) + 16)
		require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low))
		var fillers []*os.File
		for {
			f, err := os.Open("/dev/null")
			if err != nil {
				require.ErrorIs(t, err, syscall.EMFILE)
				break
			}
			fillers = append(fillers, f)
		}
		var wg sync.WaitGroup
		for _, l := range all {
			size := int64(256<<10 + rng.IntN(2<<20))
			seed := rng.Uint64()
			v := newVerifier(seed, size)
			wg.Go(func() {
				pat := newPattern(seed)
				buf := make([]byte, 64<<10)
				for left := size; left > 0; left -= int64(len(buf)) {
					b := buf[:min(int64(len(buf)), left)]
					pat.fill(b)
					if _, err := l.a.Write(b); err != nil {
						t.Errorf("legacy write: %v", err)
						return
					}
				}
				_ = l.a.CloseWrite()
			})
			wg.Go(func() { assert.NoError(t, pump(l.sa, l.up)) })
			wg.Go(func() { assert.NoError(t, deliver(l.sb, l.down)) })
			wg.Go(func() {
				_, err := io.Copy(v, l.b)
				assert.NoError(t, err)
				got, bad := v.result()
				assert.NoError(t, bad)
				assert.Equal(t, size, got)
			})
		}
		wg.Wait()
		for _, f := range fillers {
			f.Close()
		}
		require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim))
		require.Greater(t, SpliceStats().PipeShortages, before)
		require.False(t, cli.IsClosed(), "session ended: %v", cli.Err())
		for _, l := range all {
			for _, c := range []io.Closer{l.up, l.a, l.down, l.b} {
				c.Close()
			}
		}
		cli.Close()
		srv.Close()
		leaks()
	})
}
