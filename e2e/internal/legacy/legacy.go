// Package legacy is the "legacy program" of the multi-host tests: plain
// TCP clients and servers that exchange framed random data with a
// SHA-256 per frame, so that every byte that crosses the proxies is
// verified, and every connection ends with a classified Outcome.
//
// A connection starts with a hello frame from the client (its id, mode and
// how many frames follow), answered by a hello from the server (its
// host). Then, by mode:
//
//	echo  the client streams frames while the server verifies each one and
//	      sends it back; the client checks every echoed frame against what
//	      it sent. Both sides half-close after the last frame.
//	sink  the client streams frames and half-closes; the server verifies
//	      them and answers with a trailer (frames, bytes, digest of all the
//	      frame sums) that the client checks.
//
// A frame is seq (u32) | length (u32) | payload | SHA-256(seq | payload).
// Frames must arrive in order: a wrong sum, sequence number, echo or
// trailer, or bytes after the end, is Corrupt. Every side reports a Record,
// and a side reports OK only when it verified everything it expected and
// saw a clean end.
package legacy

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Mode is what a connection does.
type Mode string

// Modes.
const (
	Echo Mode = "echo"
	Sink Mode = "sink"
)

// Outcome is how one side of a connection ended.
type Outcome string

// Outcomes.
const (
	OK       Outcome = "ok"
	Reset    Outcome = "reset"     // ECONNRESET or EPIPE: the peer (or a proxy) reset
	ShortEOF Outcome = "short-eof" // a clean end (FIN) before all the data: truncation
	Timeout  Outcome = "timeout"   // the side's time bound passed: a hang
	Corrupt  Outcome = "corrupt"   // data that does not verify
	Refused  Outcome = "refused"   // the connection could not be made
	Other    Outcome = "error"
)

// ErrCorrupt is matched by errors about data that does not verify.
var ErrCorrupt = errors.New("corrupt data")

// ErrShort is matched by errors about a clean end that came too early.
var ErrShort = errors.New("clean end before all the data")

// Classify names the outcome of err.
func Classify(err error) Outcome {
	switch {
	case err == nil:
		return OK
	case errors.Is(err, ErrCorrupt):
		return Corrupt
	case errors.Is(err, os.ErrDeadlineExceeded):
		return Timeout
	case errors.Is(err, ErrShort), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return ShortEOF
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ENOTCONN):
		// ENOTCONN: a shutdown after an RST has closed the socket.
		return Reset
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	}
	return Other
}

// Record is one side of one connection.
type Record struct {
	ID     uint64
	Side   string // "client" or "server"
	Host   string // where this side runs
	Peer   string // the other side's host, when known
	Path   string // what the client connected through: "api", "ring", ...
	Remote string // server: the connection's source address as the server sees it
	Local  string // client: the connection's own address
	Mode   Mode
	Frames int // frames the client declared
	Start  time.Time
	End    time.Time
	// BytesSent is payload written; BytesVerified is payload checked by
	// this side (client: echoed frames, or the server's trailer; server:
	// received frames).
	BytesSent, BytesVerified int64
	FramesVerified           int
	Outcome                  Outcome
	Err                      string
}

func (r Record) String() string {
	addr := r.Local
	if r.Side == "server" {
		addr = "from " + r.Remote
	}
	s := fmt.Sprintf("#%d %s@%s (%s) peer=%s path=%s mode=%s frames=%d/%d bytes=%d/%d %s at %s in %v",
		r.ID, r.Side, r.Host, addr, r.Peer, r.Path, r.Mode, r.FramesVerified, r.Frames,
		r.BytesVerified, r.BytesSent, r.Outcome, r.Start.Format("15:04:05.000"), r.End.Sub(r.Start).Round(time.Millisecond))
	if r.Err != "" {
		s += ": " + r.Err
	}
	return s
}

// hello is the client's first frame.
type hello struct {
	ID     uint64 `json:"id"`
	Mode   Mode   `json:"mode"`
	Frames int    `json:"frames"`
	From   string `json:"from"`
	Path   string `json:"path"`
}

// serverHello is the server's first frame.
type serverHello struct {
	Server string `json:"server"`
}

// trailer ends a sink connection.
type trailer struct {
	Frames int    `json:"frames"`
	Bytes  int64  `json:"bytes"`
	Digest []byte `json:"digest"`
}

// MaxPayload bounds a frame.
const MaxPayload = 1 << 20

const frameHeader = 8

type sum = [sha256.Size]byte

// frameSum is SHA-256(seq | payload).
func frameSum(h hash.Hash, seq uint32, payload []byte) sum {
	h.Reset()
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], seq)
	h.Write(b[:])
	h.Write(payload)
	var s sum
	h.Sum(s[:0])
	return s
}

// appendFrame appends the encoded frame to dst.
func appendFrame(dst []byte, h hash.Hash, seq uint32, payload []byte) ([]byte, sum) {
	s := frameSum(h, seq, payload)
	dst = binary.BigEndian.AppendUint32(dst, seq)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	dst = append(dst, payload...)
	dst = append(dst, s[:]...)
	return dst, s
}

// frameReader reads and verifies frames.
type frameReader struct {
	r   *bufio.Reader
	h   hash.Hash
	buf []byte
	raw []byte // the last frame as encoded
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 64<<10), h: sha256.New()}
}

// next reads a frame, which must have sequence number want. At a frame
// boundary a clean end is io.EOF; inside a frame io.ErrUnexpectedEOF.
func (fr *frameReader) next(want uint32) ([]byte, sum, error) {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(fr.r, hdr[:]); err != nil {
		return nil, sum{}, err
	}
	seq := binary.BigEndian.Uint32(hdr[:4])
	n := binary.BigEndian.Uint32(hdr[4:])
	if n > MaxPayload {
		return nil, sum{}, fmt.Errorf("%w: frame %d announces %d bytes", ErrCorrupt, want, n)
	}
	total := frameHeader + int(n) + sha256.Size
	if cap(fr.buf) < total {
		fr.buf = make([]byte, total)
	}
	fr.raw = fr.buf[:total]
	copy(fr.raw, hdr[:])
	if _, err := io.ReadFull(fr.r, fr.raw[frameHeader:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, sum{}, err
	}
	payload := fr.raw[frameHeader : frameHeader+int(n)]
	var got sum
	copy(got[:], fr.raw[frameHeader+int(n):])
	if want := frameSum(fr.h, seq, payload); got != want {
		return nil, sum{}, fmt.Errorf("%w: frame %d: SHA-256 mismatch", ErrCorrupt, seq)
	}
	if seq != want {
		return nil, sum{}, fmt.Errorf("%w: got frame %d, want %d", ErrCorrupt, seq, want)
	}
	return payload, got, nil
}

// expectEnd reads what follows the last frame, which must be a clean end.
func (fr *frameReader) expectEnd() error {
	var b [1]byte
	n, err := fr.r.Read(b[:])
	switch {
	case n > 0:
		return fmt.Errorf("%w: data after the last frame", ErrCorrupt)
	case errors.Is(err, io.EOF):
		return nil
	case err == nil:
		return fmt.Errorf("%w: empty read", ErrCorrupt)
	}
	return err
}

// abort closes c with a reset (SO_LINGER 0) when it is TCP.
func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

type closeWriter interface{ CloseWrite() error }

// failer keeps the first error of a connection's goroutines and aborts
// the connection on it, so that the other goroutine ends too.
type failer struct {
	c    net.Conn
	mu   sync.Mutex
	err  error
	done bool
}

func (f *failer) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		return
	}
	f.done = true
	f.err = err
	abort(f.c)
}

func (f *failer) first() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// ClientSpec says what a client sends.
type ClientSpec struct {
	ID     uint64
	Mode   Mode
	Frames int
	// Payload sizes are uniform in [MinSize, MaxSize].
	MinSize, MaxSize int
	// Interval paces the frames (0: as fast as the connection takes them).
	Interval time.Duration
	// Host is where the client runs, Path what it connects through.
	Host, Path string
	// Bound is the whole connection's time limit (its deadline).
	Bound time.Duration
	Seed  uint64
}

// RunClient runs spec over c, which it closes, and reports the outcome.
// It returns within spec.Bound.
func RunClient(c net.Conn, spec ClientSpec) Record {
	rec := Record{ID: spec.ID, Side: "client", Host: spec.Host, Path: spec.Path, Mode: spec.Mode, Frames: spec.Frames,
		Local: c.LocalAddr().String(), Start: time.Now()}
	defer c.Close()
	_ = c.SetDeadline(rec.Start.Add(spec.Bound))
	f := &failer{c: c}
	sums := make(chan sum, spec.Frames)
	var sent atomic.Int64
	digest := sha256.New()
	writerDone := make(chan struct{})
	var werr error // read after writerDone
	go func() {
		defer close(writerDone)
		if err := writeFrames(c, spec, sums, &sent, digest); err != nil {
			werr = fmt.Errorf("write: %w", err)
			f.fail(werr)
		}
	}()
	verified, frames, rerr := readReplies(c, spec, sums, writerDone, digest, &sent, &rec.Peer)
	if rerr != nil {
		rerr = fmt.Errorf("read: %w", rerr)
		f.fail(rerr)
	}
	<-writerDone
	rec.End = time.Now()
	rec.BytesSent, rec.BytesVerified, rec.FramesVerified = sent.Load(), verified, frames
	if err := clientError(f.first(), rerr, werr); err != nil {
		rec.Outcome, rec.Err = Classify(err), err.Error()
	} else {
		rec.Outcome = OK
	}
	return rec
}

// clientError picks the error that says how a client connection ended,
// given the first one and those of the reader and the writer.
//
// Linux reports a received RST (ECONNRESET) to one system call only: when
// the writer's write takes it, the reader's read finds the socket shut
// down and returns 0, a clean EOF. A write fails with ECONNRESET or EPIPE
// only after an RST arrived (the client never writes after its own FIN),
// so a reader's EOF together with such a write error is a reset. A reader
// that saw EOF while the writer saw nothing wrong is a real clean end
// (FIN), which ShortEOF reports when it came before all the data.
func clientError(first, rerr, werr error) error {
	if first == nil {
		return nil
	}
	for _, err := range []error{rerr, werr} {
		if Classify(err) == Corrupt {
			return err
		}
	}
	if Classify(rerr) == ShortEOF && Classify(werr) == Reset {
		return fmt.Errorf("%w (the read then found the socket shut down: %v)", werr, rerr)
	}
	return first
}

// ClientFailed is the record of a client that could not connect.
func ClientFailed(spec ClientSpec, start time.Time, err error) Record {
	o := Classify(err)
	if o == Other || o == Timeout {
		o = Refused
	}
	return Record{ID: spec.ID, Side: "client", Host: spec.Host, Path: spec.Path, Mode: spec.Mode, Frames: spec.Frames,
		Start: start, End: time.Now(), Outcome: o, Err: err.Error()}
}

func writeFrames(c net.Conn, spec ClientSpec, sums chan<- sum, sent *atomic.Int64, digest hash.Hash) error {
	h := sha256.New()
	hb, _ := json.Marshal(hello{ID: spec.ID, Mode: spec.Mode, Frames: spec.Frames, From: spec.Host, Path: spec.Path})
	buf, _ := appendFrame(nil, h, 0, hb)
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	rng := rand.NewChaCha8(seed32(spec.Seed))
	sizes := rand.New(rand.NewPCG(spec.Seed, spec.ID))
	payload := make([]byte, spec.MaxSize)
	for i := 1; i <= spec.Frames; i++ {
		p := payload[:spec.MinSize+sizes.IntN(spec.MaxSize-spec.MinSize+1)]
		_, _ = rng.Read(p)
		var s sum
		buf, s = appendFrame(buf[:0], h, uint32(i), p)
		digest.Write(s[:]) // only the writer touches digest before the end
		sums <- s
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("frame %d: %w", i, err)
		}
		sent.Add(int64(len(p)))
		if spec.Interval > 0 && i < spec.Frames {
			time.Sleep(spec.Interval)
		}
	}
	if err := c.(closeWriter).CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	return nil
}

func seed32(s uint64) [32]byte {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[:], s)
	binary.LittleEndian.PutUint64(b[8:], ^s)
	return b
}

// readReplies reads the server's hello and then the echoes or the trailer.
func readReplies(c net.Conn, spec ClientSpec, sums <-chan sum, writerDone <-chan struct{}, digest hash.Hash, sent *atomic.Int64, peer *string) (verified int64, frames int, err error) {
	fr := newFrameReader(c)
	p, _, err := fr.next(0)
	if err != nil {
		return 0, 0, shortIfEOF(fmt.Errorf("server hello: %w", err))
	}
	var sh serverHello
	if err := json.Unmarshal(p, &sh); err != nil {
		return 0, 0, fmt.Errorf("%w: server hello: %v", ErrCorrupt, err)
	}
	*peer = sh.Server
	switch spec.Mode {
	case Echo:
		for i := 1; i <= spec.Frames; i++ {
			p, got, err := fr.next(uint32(i))
			if err != nil {
				return verified, frames, shortIfEOF(fmt.Errorf("echo of frame %d of %d: %w", i, spec.Frames, err))
			}
			want, ok := sentSum(sums, writerDone)
			if !ok {
				return verified, frames, fmt.Errorf("%w: echo of frame %d, which was never sent", ErrCorrupt, i)
			}
			if got != want {
				return verified, frames, fmt.Errorf("%w: echo of frame %d differs from what was sent", ErrCorrupt, i)
			}
			verified += int64(len(p))
			frames++
		}
	case Sink:
		p, _, err := fr.next(uint32(spec.Frames + 1))
		if err != nil {
			return 0, 0, shortIfEOF(fmt.Errorf("trailer: %w", err))
		}
		var tr trailer
		if err := json.Unmarshal(p, &tr); err != nil {
			return 0, 0, fmt.Errorf("%w: trailer: %v", ErrCorrupt, err)
		}
		// The trailer comes only after the server read our FIN, so the
		// writer has finished and the digest is complete.
		<-writerDone
		if want := digest.Sum(nil); tr.Frames != spec.Frames || tr.Bytes != sent.Load() || !bytes.Equal(tr.Digest, want) {
			return 0, 0, fmt.Errorf("%w: trailer says %d frames, %d bytes, digest %x; sent %d, %d, %x",
				ErrCorrupt, tr.Frames, tr.Bytes, tr.Digest, spec.Frames, sent.Load(), want)
		}
		verified, frames = tr.Bytes, tr.Frames
	default:
		return 0, 0, fmt.Errorf("unknown mode %q", spec.Mode)
	}
	if err := fr.expectEnd(); err != nil {
		return verified, frames, fmt.Errorf("after the last frame: %w", err)
	}
	return verified, frames, nil
}

// sentSum returns the sum of the next frame the writer sent; false if the
// writer has ended without sending one.
func sentSum(sums <-chan sum, writerDone <-chan struct{}) (sum, bool) {
	select {
	case s := <-sums:
		return s, true
	case <-writerDone:
		select {
		case s := <-sums:
			return s, true
		default:
			return sum{}, false
		}
	}
}

func shortIfEOF(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %w", ErrShort, err)
	}
	return err
}

// Server is a legacy server: it serves every connection of the listeners
// given to Serve and records each one's outcome.
type Server struct {
	Host  string
	Bound time.Duration // per connection
	Out   *Collector

	wg     sync.WaitGroup
	active atomic.Int64
}

// Serve accepts connections on ln until it is closed.
func (s *Server) Serve(ln net.Listener) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.active.Add(1)
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer s.active.Add(-1)
				s.Out.Add(s.handle(c))
			}()
		}
	}()
}

// Active is the number of connections being served.
func (s *Server) Active() int64 { return s.active.Load() }

// Wait waits for the accept loops (after their listeners are closed) and
// every connection to end, at most d; it reports whether they did.
func (s *Server) Wait(d time.Duration) bool {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

func (s *Server) handle(c net.Conn) Record {
	rec := Record{Side: "server", Host: s.Host, Remote: c.RemoteAddr().String(), Start: time.Now()}
	defer c.Close()
	_ = c.SetDeadline(rec.Start.Add(s.Bound))
	err := s.serve(c, &rec)
	rec.End = time.Now()
	if err != nil {
		rec.Outcome, rec.Err = Classify(err), err.Error()
		abort(c)
	} else {
		rec.Outcome = OK
	}
	return rec
}

func (s *Server) serve(c net.Conn, rec *Record) error {
	fr := newFrameReader(c)
	h := sha256.New()
	p, _, err := fr.next(0)
	if err != nil {
		return shortIfEOF(fmt.Errorf("client hello: %w", err))
	}
	var hi hello
	if err := json.Unmarshal(p, &hi); err != nil {
		return fmt.Errorf("%w: client hello: %v", ErrCorrupt, err)
	}
	rec.ID, rec.Peer, rec.Path, rec.Mode, rec.Frames = hi.ID, hi.From, hi.Path, hi.Mode, hi.Frames
	s.Out.started(hi.ID, s.Host)
	if hi.Mode != Echo && hi.Mode != Sink {
		return fmt.Errorf("%w: mode %q", ErrCorrupt, hi.Mode)
	}
	sb, _ := json.Marshal(serverHello{Server: s.Host})
	out, _ := appendFrame(nil, h, 0, sb)
	if _, err := c.Write(out); err != nil {
		return fmt.Errorf("server hello: %w", err)
	}
	digest := sha256.New()
	for i := 1; i <= hi.Frames; i++ {
		p, got, err := fr.next(uint32(i))
		if err != nil {
			return shortIfEOF(fmt.Errorf("frame %d of %d: %w", i, hi.Frames, err))
		}
		rec.BytesVerified += int64(len(p))
		rec.FramesVerified++
		digest.Write(got[:])
		if hi.Mode == Echo {
			if _, err := c.Write(fr.raw); err != nil {
				return fmt.Errorf("echo frame %d: %w", i, err)
			}
			rec.BytesSent += int64(len(p))
		}
	}
	if err := fr.expectEnd(); err != nil {
		return fmt.Errorf("after the last frame: %w", err)
	}
	if hi.Mode == Sink {
		tb, _ := json.Marshal(trailer{Frames: hi.Frames, Bytes: rec.BytesVerified, Digest: digest.Sum(nil)})
		out, _ = appendFrame(out[:0], h, uint32(hi.Frames+1), tb)
		if _, err := c.Write(out); err != nil {
			return fmt.Errorf("trailer: %w", err)
		}
	}
	if err := c.(closeWriter).CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	return nil
}

// Collector gathers records from many goroutines.
type Collector struct {
	mu      sync.Mutex
	recs    []Record
	servers map[uint64]string // connection id → host of the server that read its hello
}

func (c *Collector) started(id uint64, host string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.servers == nil {
		c.servers = make(map[uint64]string)
	}
	c.servers[id] = host
}

// ServedBy returns the host whose server read the hello of connection id.
func (c *Collector) ServedBy(id uint64) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	h, ok := c.servers[id]
	return h, ok
}

// Add records r.
func (c *Collector) Add(r Record) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.recs = append(c.recs, r)
}

// Records returns a copy of the records so far.
func (c *Collector) Records() []Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Record(nil), c.recs...)
}

// Summary adds up records.
type Summary struct {
	Conns, OK, Failed        int
	ByOutcome                map[Outcome]int
	BytesSent, BytesVerified int64
}

// Summarize adds up recs.
func Summarize(recs []Record) Summary {
	s := Summary{ByOutcome: make(map[Outcome]int)}
	for _, r := range recs {
		s.Conns++
		s.ByOutcome[r.Outcome]++
		if r.Outcome == OK {
			s.OK++
		} else {
			s.Failed++
		}
		s.BytesSent += r.BytesSent
		s.BytesVerified += r.BytesVerified
	}
	return s
}

func (s Summary) String() string {
	var outs []string
	for o, n := range s.ByOutcome {
		if o != OK {
			outs = append(outs, fmt.Sprintf("%s=%d", o, n))
		}
	}
	sort.Strings(outs)
	failed := "none"
	if len(outs) > 0 {
		failed = strings.Join(outs, " ")
	}
	return fmt.Sprintf("conns=%d ok=%d failed=%d (%s) bytes sent=%d verified=%d",
		s.Conns, s.OK, s.Failed, failed, s.BytesSent, s.BytesVerified)
}
