//go:build !linux

package tun

import (
	"fmt"
	"net/netip"
	"runtime"
)

// Device is a kernel TUN device; only Linux has one here.
type Device struct{}

// Create fails: the routing recipe is Linux's.
func Create(Config) (*Device, error) {
	return nil, fmt.Errorf("tun: %w: not supported on %s", ErrUnavailable, runtime.GOOS)
}

// Cleanup has nothing to do off Linux.
func Cleanup(string) (Cleaned, error) { return Cleaned{}, nil }

// ForceCleanup has nothing to do off Linux.
func ForceCleanup(string) (Cleaned, error) { return Cleaned{}, nil }

func (*Device) Name() string                           { return "" }
func (*Device) MTU() int                               { return 0 }
func (*Device) BatchSize() int                         { return 1 }
func (*Device) Read([][]byte, []int, int) (int, error) { return 0, ErrUnavailable }
func (*Device) Write([][]byte, int) (int, error)       { return 0, ErrUnavailable }
func (*Device) AddLocal(netip.Addr) error              { return ErrUnavailable }
func (*Device) RemoveLocal(netip.Addr) error           { return ErrUnavailable }
func (*Device) Close() error                           { return nil }
func (*Device) ReadFrame([][]byte) (int, error)        { return 0, ErrUnavailable }
func (*Device) WriteFrame([][]byte) error              { return ErrUnavailable }
func (*Device) Failed() <-chan struct{}                { return nil }
func (*Device) Err() error                             { return nil }
