//go:build !linux

package mux

import (
	"errors"
	"syscall"
)

// Without splice(2), sessions and streams always copy: sessions never get
// a raw connection, so none of the functions below is reached.
const spliceSupported = false

const msgMore = 0

var errNoSplice = errors.New("mux: splice is not supported on this platform")

type kpipe struct{}

func getPipe() (*kpipe, error) { return nil, errNoSplice }
func maxPipes() int32          { return 0 }
func (p *kpipe) ref()          {}
func (p *kpipe) unref()        {}

func rawConn(any) syscall.RawConn    { return nil }
func spliceConn(any) syscall.RawConn { return nil }

func fillPipe(syscall.RawConn, *kpipe, int) (int, error) { return 0, errNoSplice }
func recvPipe(syscall.RawConn, *kpipe, int) (int, bool, error) {
	return 0, false, errNoSplice
}
func drainPipe(syscall.RawConn, *kpipe, int, bool, func()) error { return errNoSplice }
func pushPipe(syscall.RawConn, *kpipe, int) (int, error)         { return 0, errNoSplice }
func writeNow(syscall.RawConn, []byte) (int, error)              { return 0, errNoSplice }
func readPipe(*kpipe, []byte) (int, error)                       { return 0, errNoSplice }
