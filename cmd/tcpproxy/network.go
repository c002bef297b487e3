package main

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/tcpproxy/tcpproxy/netstack"
	"github.com/tcpproxy/tcpproxy/proxy"
	"github.com/tcpproxy/tcpproxy/tun"
)

// tunConfig is the `tun:` section, for network: tun.
type tunConfig struct {
	// Name of the TUN device (default tcpproxy0).
	Name string `yaml:"name"`
	// MTU of the device (default 65000).
	MTU int `yaml:"mtu"`
}

func (c tunConfig) validate() error {
	if len(c.Name) > 15 {
		return fmt.Errorf("tun.name %q is longer than 15 bytes", c.Name)
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65535) {
		return fmt.Errorf("tun.mtu %d out of range 1280-65535", c.MTU)
	}
	return nil
}

// networkFor makes the Network cfg names:
//
//	loopback  host sockets on 127.0.0.0/8 (no privilege)
//	tun       a gVisor stack behind a kernel TUN device that the synthetic
//	          ranges are routed into; needs CAP_NET_ADMIN and a network
//	          namespace of the instance's own (a pod, a container)
//
// (The memory network only makes sense inside one process: see demo.)
func networkFor(cfg *fileConfig, log *slog.Logger) (proxy.Network, error) {
	switch cfg.Network {
	case "", "loopback":
		return proxy.NewLoopback(), nil
	case "tun":
		a, _ := cfg.addressing() // validated
		a = a.WithDefaults()
		bindIP, err := proxy.BindIP(a, cfg.IID)
		if err != nil {
			return nil, err
		}
		prefixes := []netip.Prefix{a.InstanceRange, a.RequestRange}
		n, err := netstack.NewTUN(netstack.Options{Prefixes: prefixes, MTU: cfg.TUN.MTU, Logger: log},
			tun.Config{Name: cfg.TUN.Name, MTU: cfg.TUN.MTU, Prefixes: prefixes, Local: []netip.Addr{bindIP}, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("network tun: %w", err)
		}
		return n, nil
	}
	return nil, fmt.Errorf("network %q cannot be used by run; use loopback or tun", cfg.Network)
}
