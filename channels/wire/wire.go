// Package wire holds the compact binary codecs spoken between tcpproxy
// nodes: the session handshake, exchanged on the raw connection before the
// multiplexer starts, and the header that opens every stream.
//
// All integers are big-endian. Strings are length-prefixed (one byte for
// names, two bytes for lists and reasons) and bounded, so a decoder never
// allocates more than the limits below, whatever a peer sends. Decoders read
// exactly the bytes of one message and nothing more, because the bytes that
// follow belong to the multiplexer or to the stream's payload.
package wire

import (
	"errors"
	"fmt"
)

// Version is the protocol version this package speaks, both in the
// handshake and in stream headers. Sessions are carried by package
// channels/mux. Version 3 acceptors ACK a stream as soon as it is
// accepted, and version 3 openers wait for those ACKs past a number of
// pending opens: an opener of version 3 would stall against an acceptor of
// version 2, which ACKed only with its first data. Version 2 introduced
// channels/mux's stream opening (SYN on a stream's first frame, in
// increasing stream ID order), which go-yamux, used by version 1, does not
// follow. A node refuses a handshake of another version with a reason.
const Version uint8 = 3

// Limits enforced by encoders and decoders.
const (
	// MaxNameLen bounds an iid, a role and a channel name (one-byte prefix).
	MaxNameLen = 255
	// MaxChannels bounds the channel list of a handshake.
	MaxChannels = 1024
	// MaxHandshakeSize bounds a whole handshake frame, prefix included.
	MaxHandshakeSize = 64 * 1024
	// MaxReasonLen bounds the reason of a rejected handshake.
	MaxReasonLen = 1024
	// MaxStreamHeaderSize is the largest possible stream header.
	MaxStreamHeaderSize = 1 + 1 + MaxNameLen + 1 + MaxNameLen + 2 + 2
)

// ErrVersion is matched (errors.Is) by every VersionError.
var ErrVersion = errors.New("unsupported protocol version")

// VersionError reports a message of a protocol version this package does
// not speak.
type VersionError struct {
	// What names the message: "handshake", "handshake reply", "stream header".
	What string
	Got  uint8
	Want uint8
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("%s: protocol version %d not supported (this node speaks %d)", e.What, e.Got, e.Want)
}

// Is makes errors.Is(err, ErrVersion) true.
func (e *VersionError) Is(target error) bool { return target == ErrVersion }

// checkName validates a name field for the encoders.
func checkName(what, s string, required bool) error {
	if required && s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > MaxNameLen {
		return fmt.Errorf("%s length %d exceeds %d", what, len(s), MaxNameLen)
	}
	return nil
}
