//go:build linux

package ns

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Impairment describes what happens to a host's outgoing packets, as in
// `tc qdisc add dev eth0 root netem delay D JITTER loss L% reorder R% rate B`.
type Impairment struct {
	Delay   time.Duration
	Jitter  time.Duration // uniform in [-Jitter, +Jitter]
	Loss    float64       // fraction of packets dropped, 0..1
	Reorder float64       // fraction of packets sent at once, ahead of delayed ones, 0..1
	// Rate is the link's speed in bits per second (0: unlimited): packets
	// leave one after another, each taking its size's time, and wait
	// their turn in a queue.
	Rate int64
	// Queue bounds how long a packet waits for the link at Rate: one that
	// would wait longer is dropped, as a router's full queue drops it
	// (default 200ms).
	Queue time.Duration
}

// defaultQueue is Impairment.Queue's default.
const defaultQueue = 200 * time.Millisecond

func (im Impairment) String() string {
	s := fmt.Sprintf("delay %v", im.Delay)
	if im.Jitter > 0 {
		s += fmt.Sprintf(" %v", im.Jitter)
	}
	s += fmt.Sprintf(" loss %g%% reorder %g%%", im.Loss*100, im.Reorder*100)
	if im.Rate > 0 {
		s += fmt.Sprintf(" rate %.3gMbit/s", float64(im.Rate)/1e6)
	}
	return s
}

func (im Impairment) netemArgs() []string {
	ms := func(d time.Duration) string { return fmt.Sprintf("%dus", d.Microseconds()) }
	args := []string{"delay", ms(im.Delay)}
	if im.Jitter > 0 {
		args = append(args, ms(im.Jitter))
	}
	args = append(args, "loss", fmt.Sprintf("%g%%", im.Loss*100))
	if im.Reorder > 0 {
		args = append(args, "reorder", fmt.Sprintf("%g%%", im.Reorder*100))
	}
	if im.Rate > 0 {
		args = append(args, "rate", fmt.Sprintf("%dbit", im.Rate))
	}
	return args
}

// ImpairStats counts the packets an impairment handled. Only the
// userspace method counts; netem reports zeros.
type ImpairStats struct {
	Packets, Dropped, Reordered, Overflow int64
}

// Impaired is an active impairment; Stop removes it.
type Impaired struct {
	// Method is "netem" (kernel qdisc) or "tun" (userspace emulation,
	// used where the kernel has no sch_netem).
	Method string
	stop   func() error
	once   sync.Once
	err    error
	stats  *impairCounters
}

type impairCounters struct {
	packets, dropped, reordered, overflow atomic.Int64
}

// Stop removes the impairment; it is idempotent.
func (i *Impaired) Stop() error {
	i.once.Do(func() { i.err = i.stop() })
	return i.err
}

// Stats returns the packet counts so far.
func (i *Impaired) Stats() ImpairStats {
	if i.stats == nil {
		return ImpairStats{}
	}
	return ImpairStats{
		Packets:   i.stats.packets.Load(),
		Dropped:   i.stats.dropped.Load(),
		Reordered: i.stats.reordered.Load(),
		Overflow:  i.stats.overflow.Load(),
	}
}

// ErrNoNetem is matched by the error of tc when the kernel lacks sch_netem.
var ErrNoNetem = errors.New("kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)")

// Netem adds a netem qdisc to the host's eth0 (its outgoing packets).
func (h *Host) Netem(im Impairment) (*Impaired, error) {
	out, err := h.Exec("tc", append([]string{"qdisc", "add", "dev", h.Dev, "root", "netem"}, im.netemArgs()...)...)
	if err != nil {
		if strings.Contains(string(out)+err.Error(), "qdisc kind is unknown") {
			return nil, fmt.Errorf("%w: %v", ErrNoNetem, err)
		}
		return nil, err
	}
	return &Impaired{Method: "netem", stop: func() error {
		_, err := h.Exec("tc", "qdisc", "del", "dev", h.Dev, "root")
		return err
	}}, nil
}

// Impair degrades the host's outgoing packets to subnet: with netem when
// the kernel has it, else with the userspace emulation of ImpairTUN.
func (h *Host) Impair(im Impairment, subnet string) (*Impaired, error) {
	i, err := h.Netem(im)
	if errors.Is(err, ErrNoNetem) {
		return h.ImpairTUN(im, subnet)
	}
	return i, err
}

// Routing table and rule priority used by ImpairTUN inside the host.
const (
	impairTable = "100"
	impairPref  = "100"
	impairDev   = "imp0"
	impairLimit = 1000 // packets held at once, as netem's default limit
)

// ImpairTUN emulates netem in userspace for kernels without it. Inside the
// host, a policy rule sends every locally generated packet to subnet into
// a TUN device; a goroutine reads each packet, drops, delays or sends it
// ahead as im says, and writes it back into the TUN, from where the
// kernel forwards it out of eth0 as usual (re-injected packets arrive on
// the TUN, so the rule, which matches only local traffic, lets them
// through). Only the host's own namespace is changed.
func (h *Host) ImpairTUN(im Impairment, subnet string) (_ *Impaired, err error) {
	var f *os.File
	if err := h.Do(func() error {
		var err error
		f, err = openTUN(impairDev)
		return err
	}); err != nil {
		return nil, err
	}
	var cleanups []func() error
	stop := func() error {
		var errs []error
		for i := len(cleanups) - 1; i >= 0; i-- {
			errs = append(errs, cleanups[i]())
		}
		return errors.Join(errs...)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, stop())
		}
	}()
	em := newEmulator(f, im)
	cleanups = append(cleanups, em.close)
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf." + impairDev + ".rp_filter", "0"},
		// Re-injected packets carry our own address as source.
		{"net.ipv4.conf." + impairDev + ".accept_local", "1"},
	} {
		if err := h.Sysctl(kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("sysctl %s: %w", kv[0], err)
		}
	}
	if err := h.IP("link", "set", impairDev, "mtu", "1500", "up"); err != nil {
		return nil, err
	}
	if err := h.IP("route", "add", subnet, "dev", impairDev, "src", h.Addr.String(), "table", impairTable); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() error { return h.IP("route", "flush", "table", impairTable) })
	if err := h.IP("rule", "add", "pref", impairPref, "iif", "lo", "to", subnet, "lookup", impairTable); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() error {
		err := h.IP("rule", "del", "pref", impairPref)
		// Let the packets already held leave before the TUN closes.
		time.Sleep(im.Delay + im.Jitter + 10*time.Millisecond)
		return err
	})
	em.start()
	return &Impaired{Method: "tun", stop: stop, stats: &em.stats}, nil
}

// openTUN creates a TUN device (no packet info header) in the calling
// thread's namespace and returns it as a pollable file.
func openTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// emulator is the userspace netem: a reader that decides each packet's
// fate and a writer that releases held packets on time.
type emulator struct {
	f     *os.File
	im    Impairment
	rng   *rand.Rand
	stats impairCounters

	free time.Time // when the link at Rate is free; the reader's

	mu      sync.Mutex
	held    packetHeap
	seq     uint64
	wake    chan struct{}
	done    chan struct{}
	stopped sync.WaitGroup
}

type heldPacket struct {
	at  time.Time
	seq uint64
	b   []byte
}

type packetHeap []heldPacket

func (h packetHeap) Len() int { return len(h) }
func (h packetHeap) Less(i, j int) bool {
	if !h[i].at.Equal(h[j].at) {
		return h[i].at.Before(h[j].at)
	}
	return h[i].seq < h[j].seq
}
func (h packetHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *packetHeap) Push(x any)   { *h = append(*h, x.(heldPacket)) }
func (h *packetHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

func newEmulator(f *os.File, im Impairment) *emulator {
	return &emulator{
		f: f, im: im,
		rng:  rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		wake: make(chan struct{}, 1),
		done: make(chan struct{}),
	}
}

func (e *emulator) start() {
	e.stopped.Add(2)
	go e.reader()
	go e.writer()
}

func (e *emulator) reader() {
	defer e.stopped.Done()
	buf := make([]byte, 65536)
	for {
		n, err := e.f.Read(buf)
		if err != nil {
			return // closed
		}
		e.stats.packets.Add(1)
		if e.rng.Float64() < e.im.Loss {
			e.stats.dropped.Add(1)
			continue
		}
		// At Rate, the packet leaves once those before it have, and takes
		// its size's time; a packet that would wait longer than the queue
		// allows is dropped.
		now := time.Now()
		depart := now
		if e.im.Rate > 0 {
			if e.free.After(now) {
				depart = e.free
			}
			queue := e.im.Queue
			if queue == 0 {
				queue = defaultQueue
			}
			if depart.Sub(now) > queue {
				e.stats.overflow.Add(1)
				continue
			}
			e.free = depart.Add(time.Duration(int64(n) * 8 * int64(time.Second) / e.im.Rate))
		}
		delay := e.im.Delay
		if e.im.Jitter > 0 {
			delay += time.Duration(e.rng.Int64N(int64(2*e.im.Jitter)+1)) - e.im.Jitter
		}
		if e.im.Reorder > 0 && e.rng.Float64() < e.im.Reorder {
			delay = 0
			e.stats.reordered.Add(1)
		}
		p := heldPacket{at: depart.Add(max(delay, 0)), b: append([]byte(nil), buf[:n]...)}
		e.mu.Lock()
		if len(e.held) >= impairLimit {
			e.mu.Unlock()
			e.stats.overflow.Add(1)
			continue
		}
		e.seq++
		p.seq = e.seq
		heap.Push(&e.held, p)
		e.mu.Unlock()
		select {
		case e.wake <- struct{}{}:
		default:
		}
	}
}

func (e *emulator) writer() {
	defer e.stopped.Done()
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		now := time.Now()
		var next time.Duration = time.Hour
		e.mu.Lock()
		var due [][]byte
		for len(e.held) > 0 {
			if wait := e.held[0].at.Sub(now); wait > 0 {
				next = wait
				break
			}
			due = append(due, heap.Pop(&e.held).(heldPacket).b)
		}
		e.mu.Unlock()
		for _, b := range due {
			_, _ = e.f.Write(b) // a full TUN queue drops, like a link
		}
		t.Reset(next)
		select {
		case <-t.C:
		case <-e.wake:
		case <-e.done:
			return
		}
	}
}

func (e *emulator) close() error {
	close(e.done)
	err := e.f.Close()
	e.stopped.Wait()
	return err
}
