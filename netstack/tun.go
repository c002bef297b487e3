package netstack

import (
	"fmt"

	"github.com/tcpproxy/tcpproxy/tun"
)

// NewTUN returns a Network on a kernel TUN device created with tun.Create
// in the calling thread's network namespace: host programs reach its
// listeners at the synthetic addresses, and its Dials reach host servers
// (those on cfg.Local addresses, such as the bind IP) from spoofed
// sources. cfg.Prefixes and cfg.MTU default to opts.Prefixes and opts.MTU
// (or tun.DefaultMTU). Close also destroys the device and its routing.
func NewTUN(opts Options, cfg tun.Config) (*Network, error) {
	if cfg.MTU == 0 {
		cfg.MTU = opts.MTU
	}
	if cfg.Logger == nil {
		cfg.Logger = opts.Logger
	}
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if len(cfg.Prefixes) == 0 {
		cfg.Prefixes = o.Prefixes
	}
	if !containedIn(o.Addr, cfg.Prefixes) {
		return nil, fmt.Errorf("netstack: address %v is outside the TUN's prefixes %v: replies to it would not come back", o.Addr, cfg.Prefixes)
	}
	dev, err := tun.Create(cfg)
	if err != nil {
		return nil, err
	}
	o.MTU = dev.MTU()
	link := newTUNLink(dev, o.MTU, o.Logger)
	n, err := newNetwork(o, link)
	if err != nil {
		dev.Close()
		link.waitReader()
		return nil, err
	}
	n.dev = dev
	n.closeLink = func() error {
		err := dev.Close()
		link.waitReader()
		return err
	}
	return n, nil
}

// TUN returns the device of a Network made by NewTUN, for AddLocal and
// RemoveLocal; nil for other Networks.
func (n *Network) TUN() *tun.Device { return n.dev }

// Failed returns a channel that is closed when the link of a Network made
// by NewTUN fails for good: its device was deleted under it, or reading it
// failed. No packet crosses the link after that, so nothing reaches the
// Network's listeners and its Dials fail; Err says why. It is never closed
// for other Networks, nor by Close.
func (n *Network) Failed() <-chan struct{} {
	if n.dev == nil {
		return nil
	}
	return n.dev.Failed()
}

// Err returns why the link failed, once Failed is closed; nil before.
func (n *Network) Err() error {
	if n.dev == nil {
		return nil
	}
	return n.dev.Err()
}
