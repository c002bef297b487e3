//go:build !linux

package mux

// sockWriter is Linux's: elsewhere sessions write through writeFlat.
type sockWriter struct{}

func newSockWriter(any, func()) *sockWriter { return nil }

func (*sockWriter) write([][]byte, int) error { return errNoSplice }
