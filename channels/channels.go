// Package channels carries byte streams between tcpproxy instances.
//
// A Node is one proxy's endpoint in the mesh: it listens for sessions from
// other proxies, dials them on demand, and multiplexes every proxied TCP
// connection as one Stream inside a single session per pair of proxies.
// Streams keep TCP semantics: CloseWrite is a FIN (the peer reads io.EOF
// while the reverse direction keeps flowing) and Reset is an RST.
//
// The proxy sees three kinds of channel:
//   - RequestChannel: the client side of a load-balanced link; Open picks one
//     reply instance with a Balancer.
//   - ReplyChannel: the server side; Accept returns streams from requesters.
//   - DuplexChannel: a symmetric group; it publishes membership, opens streams
//     to a named member and accepts streams from members.
package channels

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
)

// Stream is one proxied, full-duplex byte stream between two proxies.
type Stream interface {
	net.Conn
	// CloseWrite half-closes the stream: the peer reads io.EOF once it has
	// consumed everything written before, and can still write back.
	CloseWrite() error
	// Reset aborts the stream in both directions. The peer's pending and
	// future Read and Write calls fail with an error matching ErrStreamReset.
	Reset() error
	// AwaitReset waits, once Read has returned io.EOF, until the stream is
	// reset (an error matching ErrStreamReset), or until its write side
	// ends cleanly, it is closed or its read deadline passes (nil). A relay
	// uses it to pass on at once a reset that follows a half-close. It must
	// not run alongside a Read.
	AwaitReset() error
	// WriteTo writes what arrives to w, handing the received buffers to w
	// without a copy (or splicing them when w is a SpliceConn), until the
	// peer's FIN (nil) or an error.
	io.WriterTo
	// SpliceFrom moves what src has to read into the stream with
	// splice(2), without copying it through the process, until src has
	// nothing more right now (nil), src's end (io.EOF) or an error. It
	// fails with ErrNoSplice, having moved nothing, when the stream's
	// session cannot splice (TLS, in-memory, splicing off, not Linux) or
	// src is not a kernel socket.
	SpliceFrom(src SpliceConn) (int64, error)
}

// SpliceConn is a kernel socket at the other end of a splice: a stream's
// SpliceFrom reads from it and WriteTo writes to it with splice(2).
// Spliced is told how many bytes went that way, since they bypass the
// socket's Read and Write (byte counts, idle timers).
type SpliceConn interface {
	syscall.Conn
	Spliced(n int)
}

// ErrNoSplice is returned by Stream.SpliceFrom when it cannot splice; the
// caller copies instead.
var ErrNoSplice = errors.New("cannot splice on this stream")

// ErrStreamReset is matched (errors.Is) by the error a Stream returns after
// the peer reset it.
var ErrStreamReset = errors.New("stream reset by peer")

// ErrNoMembers is returned by Open when a channel has no member to send to.
var ErrNoMembers = errors.New("no members available")

// ErrClosed is returned by channel operations after the Node was closed.
var ErrClosed = errors.New("node closed")

// Header is sent by the opener at the start of every stream.
type Header struct {
	// Channel is the name of the channel on the receiving proxy.
	Channel string
	// SourceIID is the instance id of the opening proxy.
	SourceIID string
	// SourcePort is the legacy client's ephemeral port on the opening side.
	SourcePort uint16
	// TargetPort is the port the legacy client connected to.
	TargetPort uint16
}

// Member is one proxy instance, as published by a membership Source.
type Member struct {
	// IID is the instance id, unique in the mesh.
	IID string `yaml:"iid" json:"iid"`
	// Role is the service role of the instance.
	Role string `yaml:"role" json:"role"`
	// Addr is the transport address of the member's proxy (host:port).
	Addr string `yaml:"addr" json:"addr"`
	// Channels maps each channel the member serves (reply or duplex) to the
	// port its legacy program uses on that channel.
	Channels map[string]uint16 `yaml:"channels" json:"channels"`
}

// Serves reports whether m serves the channel name.
func (m Member) Serves(name string) bool {
	_, ok := m.Channels[name]
	return ok
}

// Incoming is a stream accepted from another proxy.
type Incoming struct {
	Stream Stream
	Header Header
	// Peer is the member that opened the stream, as authenticated by the
	// session handshake (its IID always equals Header.SourceIID).
	Peer Member
}

// RequestChannel is the client side of a load-balanced link.
type RequestChannel interface {
	Name() string
	// Open opens a stream to one of the current reply instances, chosen by
	// the channel's Balancer. When the chosen member cannot be reached, the
	// others are tried before an error is returned. When none can, but
	// some failed in a way that may pass (nothing listening, a lost
	// connection, a handshake timeout: a peer restarting, a congested
	// link), Open tries again as soon as one of them may be dialed again
	// or a session comes up, until ctx's deadline (Config.DialTimeout if
	// ctx has none). Refusals and failed certificate checks do not pass:
	// with nothing else to try, Open then fails at once.
	Open(ctx context.Context, h Header) (Stream, Member, error)
}

// ReplyChannel is the server side of a load-balanced link.
type ReplyChannel interface {
	Name() string
	// Accept waits for the next stream opened by a requester.
	Accept(ctx context.Context) (Incoming, error)
}

// DuplexChannel is a symmetric group of instances that all reach each other.
type DuplexChannel interface {
	Name() string
	// Watch sends the current remote members (never the local instance),
	// sorted by IID, at once and then after every change, until ctx ends.
	// A slow receiver may miss intermediate states but always gets the latest.
	Watch(ctx context.Context) <-chan []Member
	// Open opens a stream to the member with the given instance id. A
	// member whose dials fail in a way that may pass (see
	// RequestChannel.Open) is dialed again until ctx's deadline, as long
	// as it stays a member.
	Open(ctx context.Context, iid string, h Header) (Stream, error)
	// Accept waits for the next stream opened by a member.
	Accept(ctx context.Context) (Incoming, error)
}

// Source publishes the members of the mesh.
type Source interface {
	// Watch sends the full member list at once and after every change, until
	// ctx ends; then the channel is closed. The local instance may be listed.
	Watch(ctx context.Context) (<-chan []Member, error)
}
