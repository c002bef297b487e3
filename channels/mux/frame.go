package mux

import (
	"encoding/binary"
	"fmt"
)

// The wire format is yamux's version 0 framing: every frame starts with a
// 12-byte big-endian header
//
//	version u8 | type u8 | flags u16 | stream ID u32 | length u32
//
// and data frames carry length payload bytes after it.
const (
	protoVersion = 0
	headerSize   = 12

	// initialWindow is the receive window every stream starts with, in
	// both directions, without any frame announcing it.
	initialWindow = 256 << 10
)

// Frame types.
const (
	typeData         uint8 = iota // length payload bytes follow
	typeWindowUpdate              // length is a window delta
	typePing                      // length is an opaque id
	typeGoAway                    // length is a goAway code
	numTypes
)

// Frame flags.
const (
	flagSYN uint16 = 1 << iota // first frame of a stream; on a ping: request
	flagACK                    // first frame of the acceptor; on a ping: reply
	flagFIN                    // half-close: no more data from the sender
	flagRST                    // abort the stream in both directions
)

// GoAway codes.
const (
	goAwayNormal   uint32 = 0
	goAwayProtocol uint32 = 1
	goAwayInternal uint32 = 2
)

// header is a decoded frame header.
type header struct {
	version uint8
	typ     uint8
	flags   uint16
	id      uint32
	length  uint32
}

// encode writes h into b[:headerSize], always with our protocol version.
func (h header) encode(b []byte) {
	_ = b[headerSize-1]
	b[0] = protoVersion
	b[1] = h.typ
	binary.BigEndian.PutUint16(b[2:4], h.flags)
	binary.BigEndian.PutUint32(b[4:8], h.id)
	binary.BigEndian.PutUint32(b[8:12], h.length)
}

func decodeHeader(b []byte) header {
	_ = b[headerSize-1]
	return header{
		version: b[0],
		typ:     b[1],
		flags:   binary.BigEndian.Uint16(b[2:4]),
		id:      binary.BigEndian.Uint32(b[4:8]),
		length:  binary.BigEndian.Uint32(b[8:12]),
	}
}

func (h header) String() string {
	return fmt.Sprintf("version %d type %d flags %#x stream %d length %d", h.version, h.typ, h.flags, h.id, h.length)
}
