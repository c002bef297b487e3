//go:build !linux

package mux

import (
	"net"
	"sync/atomic"
	"syscall"
	"time"
)

// sockWriter is Linux's: elsewhere sessions write through writeFlat.
type sockWriter struct{}

func newSockWriter(any, func(), *atomic.Uint64) *sockWriter { return nil }

// Elsewhere the keepalive counts the bytes written instead.
func tcpConn(net.Conn) syscall.RawConn                     { return nil }
func tcpBytesAcked(syscall.RawConn) (uint64, bool)         { return 0, false }
func tcpSilence(syscall.RawConn) time.Duration             { return 0 }
func tcpSendState(syscall.RawConn) (uint64, bool, bool)    { return 0, false, false }
func tcpPaceState(syscall.RawConn) (tcpPace, bool)         { return tcpPace{}, false }
func setNotSentLowat(syscall.RawConn, int)                 {}
func setRetransmitCap(syscall.RawConn, time.Duration) bool { return false }
func setUserTimeout(syscall.RawConn, time.Duration)        {}
func kernelGiveUp() time.Duration                          { return 0 }
func shutdownWrite(syscall.RawConn) bool                   { return false }
func tcpAllAcked(syscall.RawConn) (bool, bool)             { return false, false }

func (*sockWriter) write([][]byte, int) error { return errNoSplice }
