package wire

import (
	"encoding/binary"
	"fmt"
	"io"
)

// StreamHeader is written by the opener as the first bytes of every stream.
//
// Layout: version u8 | channel len u8 | channel | source iid len u8 |
// source iid | source port u16 | target port u16.
type StreamHeader struct {
	Channel    string
	SourceIID  string
	SourcePort uint16
	TargetPort uint16
}

// AppendStreamHeader appends the encoding of h to dst.
func AppendStreamHeader(dst []byte, h StreamHeader) ([]byte, error) {
	if err := checkName("channel name", h.Channel, true); err != nil {
		return dst, fmt.Errorf("stream header: %w", err)
	}
	if err := checkName("source iid", h.SourceIID, true); err != nil {
		return dst, fmt.Errorf("stream header: %w", err)
	}
	dst = append(dst, Version, byte(len(h.Channel)))
	dst = append(dst, h.Channel...)
	dst = append(dst, byte(len(h.SourceIID)))
	dst = append(dst, h.SourceIID...)
	dst = binary.BigEndian.AppendUint16(dst, h.SourcePort)
	dst = binary.BigEndian.AppendUint16(dst, h.TargetPort)
	return dst, nil
}

// WriteStreamHeader writes h to w in one Write call.
func WriteStreamHeader(w io.Writer, h StreamHeader) error {
	var buf [MaxStreamHeaderSize]byte
	b, err := AppendStreamHeader(buf[:0], h)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("stream header: write: %w", err)
	}
	return nil
}

// ReadStreamHeader reads exactly one stream header from r. It never reads
// past the header, so the stream's payload stays in r.
func ReadStreamHeader(r io.Reader) (StreamHeader, error) {
	var buf [MaxStreamHeaderSize]byte
	// Version and channel length.
	if _, err := io.ReadFull(r, buf[:2]); err != nil {
		return StreamHeader{}, fmt.Errorf("stream header: read version: %w", err)
	}
	if buf[0] != Version {
		return StreamHeader{}, &VersionError{What: "stream header", Got: buf[0], Want: Version}
	}
	chanLen := int(buf[1])
	if chanLen == 0 {
		return StreamHeader{}, fmt.Errorf("stream header: channel name is empty")
	}
	// Channel name and the source iid's length.
	if _, err := io.ReadFull(r, buf[:chanLen+1]); err != nil {
		return StreamHeader{}, fmt.Errorf("stream header: read channel name (%d bytes): %w", chanLen, unexpectedEOF(err))
	}
	var h StreamHeader
	h.Channel = string(buf[:chanLen])
	iidLen := int(buf[chanLen])
	if iidLen == 0 {
		return StreamHeader{}, fmt.Errorf("stream header: source iid is empty")
	}
	// Source iid and both ports.
	if _, err := io.ReadFull(r, buf[:iidLen+4]); err != nil {
		return StreamHeader{}, fmt.Errorf("stream header: read source iid (%d bytes) and ports: %w", iidLen, unexpectedEOF(err))
	}
	h.SourceIID = string(buf[:iidLen])
	h.SourcePort = binary.BigEndian.Uint16(buf[iidLen:])
	h.TargetPort = binary.BigEndian.Uint16(buf[iidLen+2:])
	return h, nil
}

// unexpectedEOF turns a clean EOF in the middle of a message into
// io.ErrUnexpectedEOF: only a message that never started may end cleanly,
// and no caller treats a partial message as an orderly close.
func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
