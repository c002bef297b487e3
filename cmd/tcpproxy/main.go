// Command tcpproxy runs the tcpproxy userspace proxy.
//
//	tcpproxy demo                                 a whole mesh in one process
//	tcpproxy run -config file.yaml [-- cmd args]  one instance, optionally with its legacy program
//	tcpproxy status [-admin 127.0.0.1:9090] [-json | -check | -live]
//	tcpproxy certs -dir DIR IID:ROLE...          development CA and instance certificates
//	tcpproxy version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
)

// version is set with -ldflags "-X main.version=..."; otherwise the module
// version from the build info is used.
var version = ""

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(ctx, args[1:], stderr)
	case "demo":
		err = cmdDemo(ctx, args[1:], stdout, stderr)
	case "status":
		err = cmdStatus(ctx, args[1:], stdout, stderr)
	case "certs":
		err = cmdCerts(args[1:], stdout, stderr)
	case "tun":
		err = cmdTUN(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "tcpproxy", buildVersion())
		return 0
	case "help", "-h", "-help", "--help":
		usage(stdout)
		return 0
	default:
		fmt.Fprintf(stderr, "tcpproxy: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "tcpproxy %s: %v\n", args[0], err)
		var ue usageError
		if errors.As(err, &ue) {
			return 2
		}
		return 1
	}
	return 0
}

// usageError marks command-line mistakes (exit status 2).
type usageError struct{ error }

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  tcpproxy demo [-v]                               run a small mesh in one process and show it working
  tcpproxy run -config FILE [-- COMMAND ARGS...]   run one proxy instance (and its legacy program)
  tcpproxy status [-admin ADDR] [-json]            show a running instance: members, sessions, channels
  tcpproxy status -check | -live                   readiness or liveness of a running instance (exit status)
  tcpproxy certs [-dir DIR] IID:ROLE...             make a development CA and instance certificates for mutual TLS
  tcpproxy tun cleanup [-name NAME]                remove a crashed network: tun instance's device and routing
  tcpproxy version
`)
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if s == "" {
		return slog.LevelInfo, nil
	}
	if err := l.UnmarshalText([]byte(strings.ToUpper(s))); err != nil {
		return l, fmt.Errorf("log.level: unknown %q (want debug, info, warn or error)", s)
	}
	return l, nil
}

func newLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
