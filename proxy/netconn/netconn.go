// Package netconn is the contract between the proxy and a network where
// legacy programs' TCP sockets live (host sockets, a gVisor stack): the
// connections such a network hands out must carry TCP's half-close and
// reset across the proxy, as *net.TCPConn does.
package netconn

import "net"

// Conn is a legacy-side TCP connection.
type Conn interface {
	net.Conn
	// CloseWrite sends FIN: the peer reads EOF, and this side can still
	// read.
	CloseWrite() error
	// SetLinger(0) makes Close send RST and discard unsent data (an
	// abortive close); SetLinger(-1) restores the graceful close, which
	// sends what is buffered and then FIN.
	SetLinger(sec int) error
}

// Listener accepts legacy-side connections.
type Listener interface {
	// Accept waits for the next connection; after Close it fails with an
	// error matching net.ErrClosed.
	Accept() (Conn, error)
	Close() error
	Addr() net.Addr
}

// ResetAwaiter is a Conn that can wait, after its read side ended with
// EOF, for the peer's reset without reading: AwaitReset returns the reset
// as an error, or nil once the connection is closed or its read deadline
// passes. The proxy uses it to pass a reset that follows a half-close on at
// once. Kernel sockets need not implement it: the proxy watches their
// state through syscall.Conn.
type ResetAwaiter interface {
	AwaitReset() error
}

// ResetChecker is a Conn that tells, without reading, whether its peer
// has reset it (or it failed otherwise): the proxy asks while it does not
// read the conn because data read from it waits to be sent on. Kernel
// sockets need not implement it: the proxy reads their pending error.
type ResetChecker interface {
	PeerReset() bool
}

// TCPListener adapts a *net.TCPListener.
type TCPListener struct{ *net.TCPListener }

// Accept returns the next connection as a Conn.
func (l TCPListener) Accept() (Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// NetListener returns l as a net.Listener, for code written for one.
func NetListener(l Listener) net.Listener { return netListener{l} }

type netListener struct{ Listener }

func (l netListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return c, nil
}

var _ Conn = (*net.TCPConn)(nil)
