package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/tcpproxy/tcpproxy/tun"
)

// cmdTUN handles `tcpproxy tun cleanup [-name NAME] [-force]`: it removes
// the device, routes and rules a crashed `run` with network: tun left
// behind in the current network namespace. It is idempotent, and leaves a
// device that a running instance holds alone unless forced.
func cmdTUN(args []string, stdout, stderr io.Writer) error {
	const usage = "usage: tcpproxy tun cleanup [-name NAME] [-force]"
	if len(args) == 0 || args[0] != "cleanup" {
		return usageError{errors.New(usage)}
	}
	fs := flag.NewFlagSet("tun cleanup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, usage)
		fs.PrintDefaults()
	}
	name := fs.String("name", tun.DefaultName, "TUN device name (tun.name in the config)")
	force := fs.Bool("force", false, "clean up even a device that a running instance holds open (it loses its network)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	clean := tun.Cleanup
	if *force {
		clean = tun.ForceCleanup
	}
	cleaned, err := clean(*name)
	if errors.Is(err, tun.ErrInUse) {
		return fmt.Errorf("cleanup %s: a running instance holds TUN device %s open; stop it (it removes its routing as it exits), or use -force", *name, *name)
	}
	if err != nil {
		return fmt.Errorf("cleanup %s: %w", *name, err)
	}
	if cleaned.Nothing() {
		fmt.Fprintf(stdout, "nothing to clean up: no TUN device %s and none of its routing in this network namespace\n", *name)
		return nil
	}
	fmt.Fprintf(stdout, "cleaned up TUN device %s: %v\n", *name, cleaned)
	return nil
}
