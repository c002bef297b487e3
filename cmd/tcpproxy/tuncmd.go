package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/tcpproxy/tcpproxy/tun"
)

// cmdTUN handles `tcpproxy tun cleanup [-name NAME]`: it removes the
// device, routes and rules a crashed `run` with network: tun left behind
// in the current network namespace. It is idempotent.
func cmdTUN(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "cleanup" {
		return usageError{errors.New("usage: tcpproxy tun cleanup [-name NAME]")}
	}
	fs := flag.NewFlagSet("tun cleanup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", tun.DefaultName, "TUN device name (tun.name in the config)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	cleaned, err := tun.Cleanup(*name)
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
