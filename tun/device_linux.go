package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

const cloneDevice = "/dev/net/tun"

// Device is a kernel TUN device with the synthetic prefixes routed into it.
// Read returns the packets the host sends to those prefixes; Write delivers
// packets to the host. ReadFrame and WriteFrame do the same with the
// device's own framing (a virtio-net header per packet), leaving checksums
// and segmentation to the caller and the kernel: package netstack uses
// them.
type Device struct {
	cfg     Config
	log     *slog.Logger
	dev     wgtun.Device
	fd      syscall.RawConn // dev's file, for ReadFrame and WriteFrame
	closed  atomic.Bool
	nl      *netlink.Handle
	routing routing
	lo      int
	events  sync.WaitGroup

	mu     sync.Mutex
	locals map[netip.Addr]bool

	// failed is closed when the device is lost under the Device (see
	// Failed); failure says how.
	failOnce  sync.Once
	failed    chan struct{}
	failure   error
	watchLink chan int // the link's index, once it is up

	closeOnce sync.Once
	closeErr  error
}

// Create makes the TUN device described by cfg in the calling thread's
// network namespace and routes cfg.Prefixes into it, as the package
// documentation describes. It fails with an error wrapping ErrUnavailable
// when the process lacks /dev/net/tun or CAP_NET_ADMIN.
func Create(cfg Config) (_ *Device, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(cloneDevice); err != nil {
		return nil, fmt.Errorf("tun: %w: %w", ErrUnavailable, err)
	}
	dev, err := wgtun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			err = fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("tun: create device %s: %w", cfg.Name, err)
	}
	d := &Device{
		cfg:     cfg,
		log:     cfg.Logger.With("tun", cfg.Name),
		dev:     dev,
		routing: routing{table: Table(cfg.Name)},
		locals:  make(map[netip.Addr]bool),
		failed:  make(chan struct{}),
	}
	// wireguard's monitor goroutines block on a small event channel,
	// drained until Close closes it. Its events come with every change of
	// the link; once the link is set up (watchLink), each makes the
	// Device look at the link, which fails it if the link went down.
	d.events.Add(1)
	d.watchLink = make(chan int, 1)
	go func() {
		defer d.events.Done()
		index, watch := 0, d.watchLink
		events := dev.Events()
		for {
			select {
			case index = <-watch:
				watch = nil
			case _, ok := <-events:
				if !ok {
					return
				}
				if index != 0 && !d.closed.Load() {
					d.checkLink(index)
				}
			}
		}
	}()
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	if d.fd, err = dev.File().SyscallConn(); err != nil {
		return nil, fmt.Errorf("tun: device %s: %w", cfg.Name, err)
	}

	d.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("tun: netlink: %w", err)
	}
	d.routing.nl = d.nl
	if err := d.setup(); err != nil {
		if errors.Is(err, os.ErrPermission) {
			err = fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return nil, err
	}
	d.log.Info("tun: device up", "mtu", cfg.MTU, "table", d.routing.table,
		"prefixes", cfg.Prefixes, "source", cfg.Source, "local", cfg.Local)
	return d, nil
}

// setup configures sysctls, brings the link up and installs the routing.
func (d *Device) setup() error {
	link, err := d.nl.LinkByName(d.cfg.Name)
	if err != nil {
		return fmt.Errorf("tun: find link %s: %w", d.cfg.Name, err)
	}
	lo, err := d.nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("tun: find link lo: %w", err)
	}
	d.lo = lo.Attrs().Index

	perDevice := []struct{ key, value string }{
		// The kernel routes and accepts 127/8 on a non-loopback interface
		// only with route_localnet, in effect when "all" or the device has
		// it: the device's is enough and leaves other interfaces alone.
		{"net/ipv4/conf/" + d.cfg.Name + "/route_localnet", "1"},
		// Replies from synthetic sources arrive on the TUN; the reverse
		// path check must not drop them.
		{"net/ipv4/conf/" + d.cfg.Name + "/rp_filter", "0"},
	}
	for _, s := range perDevice {
		// The device's settings vanish with it: nothing to restore.
		if err := setSysctl(s.key, s.value); err != nil {
			return err
		}
	}
	// No IPv6 on the device: the stack behind it speaks IPv4 only, so
	// router solicitations and the like are noise.
	_ = setSysctl("net/ipv6/conf/"+d.cfg.Name+"/disable_ipv6", "1") // absent without IPv6

	if err := d.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("tun: set link %s up: %w", d.cfg.Name, err)
	}
	d.watchLink <- link.Attrs().Index
	for _, a := range d.cfg.Local {
		d.locals[a] = true
	}
	return d.routing.apply(link.Attrs().Index, d.lo, d.cfg.Prefixes, d.cfg.Source, d.cfg.Local)
}

// checkLink fails the Device if its link is down or gone: the kernel
// deletes the routes of a link that goes down, and setting it up again
// does not restore them (an operator's `ip link set down`; a deletion goes
// down first). A failed look is left for the next event.
func (d *Device) checkLink(index int) {
	link, err := d.nl.LinkByIndex(index)
	var gone netlink.LinkNotFoundError
	switch {
	case errors.As(err, &gone):
		d.fail(fmt.Errorf("tun: device %s was deleted", d.cfg.Name))
	case err == nil && link.Attrs().Flags&net.FlagUp == 0:
		d.fail(fmt.Errorf("tun: device %s went down, and the routes into it with it", d.cfg.Name))
	}
}

// fail records that the device is lost, once.
func (d *Device) fail(err error) {
	d.failOnce.Do(func() {
		d.failure = err
		d.log.Error("tun: device lost; no packet crosses it any more", "err", err)
		close(d.failed)
	})
}

// Failed returns a channel that is closed when the device is lost under
// the Device: the link went down after it was up, taking the routes into
// it along, or was deleted (an operator's `ip link`, a CNI plugin cleaning
// up), or ReadFrame failed other than after Close.
// No packet crosses it after that; Err says why. Close does not close it.
func (d *Device) Failed() <-chan struct{} { return d.failed }

// Err returns why the device was lost, once Failed is closed; nil before.
func (d *Device) Err() error {
	select {
	case <-d.failed:
		return d.failure
	default:
		return nil
	}
}

// Name returns the device's name.
func (d *Device) Name() string { return d.cfg.Name }

// MTU returns the device's MTU.
func (d *Device) MTU() int { return d.cfg.MTU }

// BatchSize is the most packets one Read returns or one Write should carry.
func (d *Device) BatchSize() int { return d.dev.BatchSize() }

// Read reads one or more packets into bufs, each at bufs[i][offset:], and
// their sizes into sizes; offset must be at least Offset. Large segments
// the kernel hands over with TSO are split to the MTU. After Close it
// returns an error matching os.ErrClosed.
func (d *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return d.dev.Read(bufs, sizes, offset)
}

// Write writes the packets bufs[i][offset:]; offset must be at least
// Offset. Consecutive TCP segments may be coalesced (GRO) for the kernel.
func (d *Device) Write(bufs [][]byte, offset int) (int, error) {
	return d.dev.Write(bufs, offset)
}

// ReadFrame reads one frame from the device, scattered over bufs as by
// readv(2), and returns its length: a virtio.NetHdr (virtio.NetHdrLen bytes)
// followed by one IP packet, as the kernel handed it over. With the
// offloads the device has (TUN_F_CSUM, TSO, USO), a packet the host sent
// over TCP or UDP usually carries a partial checksum
// (virtio.FlagNeedsCsum), and a TSO burst arrives whole, up to 64 KiB,
// with GSOType and GSOSize set; bufs should hold 64 KiB plus the header.
// Unlike Read it neither completes checksums nor splits bursts. Do not mix
// it with Read. After Close it returns an error matching os.ErrClosed.
func (d *Device) ReadFrame(bufs [][]byte) (int, error) {
	var n int
	var errno error
	err := d.fd.Read(func(fd uintptr) bool {
		for {
			n, errno = unix.Readv(int(fd), bufs)
			if errno != unix.EINTR {
				return errno != unix.EAGAIN
			}
		}
	})
	err = d.ioError(err, errno)
	if err != nil && !d.closed.Load() {
		d.fail(err)
	}
	return n, err
}

// WriteFrame writes one frame, gathered from bufs as by writev(2): a
// virtio.NetHdr followed by one IP packet. With virtio.FlagNeedsCsum, the
// kernel takes the transport checksum as partial and does not verify it;
// with a GSOType the packet may be as large as 64 KiB whatever the MTU.
// Safe for concurrent use. After Close it returns an error matching
// os.ErrClosed.
func (d *Device) WriteFrame(bufs [][]byte) error {
	var errno error
	err := d.fd.Write(func(fd uintptr) bool {
		for {
			_, errno = unix.Writev(int(fd), bufs)
			if errno != unix.EINTR {
				return errno != unix.EAGAIN
			}
		}
	})
	return d.ioError(err, errno)
}

// ioError is the error of ReadFrame or WriteFrame from the poller's error
// (the file is closed) and the system call's.
func (d *Device) ioError(err, errno error) error {
	if err == nil {
		err = errno
	}
	switch {
	case err == nil:
		return nil
	case d.closed.Load():
		// The poller's "use of closed file" does not match os.ErrClosed.
		return fmt.Errorf("tun: %s: %w", d.cfg.Name, os.ErrClosed)
	case errors.Is(err, unix.EBADFD):
		// The device was deleted under the file: it is closed for good.
		return fmt.Errorf("tun: device %s was deleted: %w", d.cfg.Name, os.ErrClosed)
	}
	return fmt.Errorf("tun: %s: %w", d.cfg.Name, err)
}

// AddLocal keeps a on the host: packets to it are delivered to host
// sockets instead of the device. Use it for the instance's bind IP when it
// is known after Create.
func (d *Device) AddLocal(a netip.Addr) error {
	if !a.Is4() {
		return fmt.Errorf("tun: local address %v is not IPv4", a)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.routing.addLocal(d.lo, a); err != nil {
		return err
	}
	d.locals[a] = true
	return nil
}

// RemoveLocal undoes AddLocal (or Config.Local) for a.
func (d *Device) RemoveLocal(a netip.Addr) error {
	if a == d.cfg.Source {
		return fmt.Errorf("tun: %v is the source address and stays local", a)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.locals[a] {
		return nil
	}
	if err := d.routing.removeLocal(d.lo, a); err != nil {
		return err
	}
	delete(d.locals, a)
	return nil
}

// Close removes the routing, restores the namespace's settings and
// destroys the device. It is idempotent.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		var errs []error
		if d.nl != nil {
			_, err := d.routing.undo()
			errs = append(errs, err)
		}
		if err := d.dev.Close(); err != nil {
			errs = append(errs, fmt.Errorf("tun: close device %s: %w", d.cfg.Name, err))
		}
		d.events.Wait()
		if d.nl != nil {
			d.nl.Close()
		}
		d.closeErr = errors.Join(errs...)
		d.log.Info("tun: device closed", "err", d.closeErr)
	})
	return d.closeErr
}

// Cleanup removes what a Device called name left behind in the calling
// thread's network namespace when its process died without Close: its
// rules and table and, unless another device of this package is active,
// the moved local rule; and the device itself if it still exists. It is
// idempotent, and says what it removed. A device that a process still has
// open belongs to a running instance: Cleanup then removes nothing and
// returns an error matching ErrInUse (ForceCleanup removes it anyway).
func Cleanup(name string) (Cleaned, error) { return cleanup(name, false) }

// ForceCleanup is Cleanup even of a device in use: the instance that has
// it open loses its network.
func ForceCleanup(name string) (Cleaned, error) { return cleanup(name, true) }

func cleanup(name string, force bool) (Cleaned, error) {
	if name == "" {
		name = DefaultName
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return Cleaned{}, fmt.Errorf("tun: cleanup %s: netlink: %w", name, err)
	}
	defer h.Close()
	var tt *netlink.Tuntap
	if link, err := h.LinkByName(name); err == nil {
		tt, _ = link.(*netlink.Tuntap)
	}
	// A non-persistent TUN device exists only while a process holds it
	// open, and an attached queue is an open file: either way an instance
	// is running on it.
	if tt != nil && (tt.NonPersist || tt.Queues > 0) && !force {
		return Cleaned{}, fmt.Errorf("tun: cleanup %s: %w", name, ErrInUse)
	}
	c, err := routing{nl: h, table: Table(name)}.undo()
	errs := []error{err}
	if tt != nil {
		if err := h.LinkDel(tt); err == nil {
			c.Device = true
		} else {
			errs = append(errs, fmt.Errorf("tun: delete device %s: %w", name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		if errors.Is(err, os.ErrPermission) {
			err = fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return c, fmt.Errorf("tun: cleanup %s: %w", name, err)
	}
	return c, nil
}
