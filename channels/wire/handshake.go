package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Magic opens every handshake frame, so that a node that dialed something
// other than a tcpproxy node fails with a clear error instead of a
// confusing decode error further in.
var Magic = [4]byte{'T', 'C', 'P', 'X'}

// Frame types.
const (
	frameHello  uint8 = 1 // dialer -> listener: Hello
	frameAccept uint8 = 2 // listener -> dialer: the listener's Hello
	frameReject uint8 = 3 // listener -> dialer: the reason
)

// prefixSize is the fixed frame prefix: magic | version u8 | type u8 |
// body length u16. Its layout is the same in every protocol version, so a
// node can always read a peer's frame far enough to reject it with a
// reason; the body of a reject frame (the reason's bytes) is also fixed
// across versions.
const prefixSize = len(Magic) + 1 + 1 + 2

// maxBody is the largest body that keeps a frame within MaxHandshakeSize.
const maxBody = MaxHandshakeSize - prefixSize

// Hello is one node's side of the session handshake.
//
// Body layout: iid len u8 | iid | role len u8 | role | count u16 |
// count × (name len u8 | name).
type Hello struct {
	IID  string
	Role string
	// Channels lists the reply and duplex channels the node serves.
	Channels []string
}

// Reply is the listener's answer to a Hello.
type Reply struct {
	// Accepted is true when the listener will start a session.
	Accepted bool
	// Reason says why the listener refused (only when !Accepted).
	Reason string
	// Hello is the listener's identity (only when Accepted).
	Hello Hello
}

// WriteHello writes the dialer's handshake frame to w in one Write call.
func WriteHello(w io.Writer, h Hello) error {
	body, err := appendHelloBody(nil, h)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	return writeFrame(w, "handshake", frameHello, body)
}

// ReadHello reads exactly one handshake frame (the dialer's) from r. A frame
// of another protocol version is consumed whole and reported as a
// *VersionError, so the caller can still reject it with a reason.
func ReadHello(r io.Reader) (Hello, error) {
	typ, body, err := readFrame(r, "handshake")
	if err != nil {
		return Hello{}, err
	}
	if typ != frameHello {
		return Hello{}, fmt.Errorf("handshake: frame type %d is not a hello", typ)
	}
	h, err := parseHelloBody(body)
	if err != nil {
		return Hello{}, fmt.Errorf("handshake: %w", err)
	}
	return h, nil
}

// WriteReply writes the listener's answer to w in one Write call.
func WriteReply(w io.Writer, rp Reply) error {
	if !rp.Accepted {
		reason := rp.Reason
		if len(reason) > MaxReasonLen {
			reason = reason[:MaxReasonLen] // a long reason is cut, not refused
		}
		return writeFrame(w, "handshake reply", frameReject, []byte(reason))
	}
	body, err := appendHelloBody(nil, rp.Hello)
	if err != nil {
		return fmt.Errorf("handshake reply: %w", err)
	}
	return writeFrame(w, "handshake reply", frameAccept, body)
}

// ReadReply reads exactly one reply frame from r. A rejection is decoded
// whatever the listener's protocol version, so the dialer can tell why it
// was refused; an acceptance in another version is a *VersionError.
func ReadReply(r io.Reader) (Reply, error) {
	typ, body, err := readFrame(r, "handshake reply")
	var verr *VersionError
	if errors.As(err, &verr) && typ == frameReject {
		return Reply{Reason: fmt.Sprintf("%s (peer speaks protocol version %d)", body, verr.Got)}, nil
	}
	if err != nil {
		return Reply{}, err
	}
	switch typ {
	case frameReject:
		if len(body) > MaxReasonLen {
			return Reply{}, fmt.Errorf("handshake reply: reason length %d exceeds %d", len(body), MaxReasonLen)
		}
		return Reply{Reason: string(body)}, nil
	case frameAccept:
		h, err := parseHelloBody(body)
		if err != nil {
			return Reply{}, fmt.Errorf("handshake reply: %w", err)
		}
		return Reply{Accepted: true, Hello: h}, nil
	default:
		return Reply{}, fmt.Errorf("handshake reply: frame type %d is neither accept nor reject", typ)
	}
}

func writeFrame(w io.Writer, what string, typ uint8, body []byte) error {
	if len(body) > maxBody {
		return fmt.Errorf("%s: size %d exceeds %d", what, prefixSize+len(body), MaxHandshakeSize)
	}
	frame := make([]byte, 0, prefixSize+len(body))
	frame = append(frame, Magic[:]...)
	frame = append(frame, Version, typ)
	frame = binary.BigEndian.AppendUint16(frame, uint16(len(body)))
	frame = append(frame, body...)
	if _, err := w.Write(frame); err != nil {
		return fmt.Errorf("%s: write: %w", what, err)
	}
	return nil
}

// readFrame reads one frame. On a version mismatch it still returns the
// frame type and body along with a *VersionError.
func readFrame(r io.Reader, what string) (uint8, []byte, error) {
	var prefix [prefixSize]byte
	if n, err := io.ReadFull(r, prefix[:]); err != nil {
		m := min(n, len(Magic))
		if !bytes.Equal(prefix[:m], Magic[:m]) {
			return 0, nil, fmt.Errorf("%s: bad magic %q, not a tcpproxy node: %w", what, prefix[:m], err)
		}
		if n > 0 {
			err = unexpectedEOF(err)
		}
		return 0, nil, fmt.Errorf("%s: read prefix: %w", what, err)
	}
	if !bytes.Equal(prefix[:len(Magic)], Magic[:]) {
		return 0, nil, fmt.Errorf("%s: bad magic %q, not a tcpproxy node", what, prefix[:len(Magic)])
	}
	version, typ := prefix[4], prefix[5]
	size := int(binary.BigEndian.Uint16(prefix[6:]))
	if size > maxBody {
		return 0, nil, fmt.Errorf("%s: body length %d exceeds %d", what, size, maxBody)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, fmt.Errorf("%s: read body (%d bytes): %w", what, size, unexpectedEOF(err))
	}
	if version != Version {
		return typ, body, &VersionError{What: what, Got: version, Want: Version}
	}
	return typ, body, nil
}

func appendHelloBody(dst []byte, h Hello) ([]byte, error) {
	if err := checkName("iid", h.IID, true); err != nil {
		return nil, err
	}
	if err := checkName("role", h.Role, false); err != nil {
		return nil, err
	}
	if len(h.Channels) > MaxChannels {
		return nil, fmt.Errorf("channel count %d exceeds %d", len(h.Channels), MaxChannels)
	}
	seen := make(map[string]bool, len(h.Channels))
	for i, c := range h.Channels {
		if err := checkName(fmt.Sprintf("channel %d name", i), c, true); err != nil {
			return nil, err
		}
		if seen[c] {
			return nil, fmt.Errorf("channel %q listed twice", c)
		}
		seen[c] = true
	}
	dst = append(dst, byte(len(h.IID)))
	dst = append(dst, h.IID...)
	dst = append(dst, byte(len(h.Role)))
	dst = append(dst, h.Role...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(h.Channels)))
	for _, c := range h.Channels {
		dst = append(dst, byte(len(c)))
		dst = append(dst, c...)
	}
	if len(dst) > maxBody {
		return nil, fmt.Errorf("size %d exceeds %d", prefixSize+len(dst), MaxHandshakeSize)
	}
	return dst, nil
}

// parseHelloBody decodes a body that readFrame already bounded.
func parseHelloBody(b []byte) (Hello, error) {
	d := decoder{b: b}
	var h Hello
	var err error
	if h.IID, err = d.name("iid"); err != nil {
		return Hello{}, err
	}
	if h.IID == "" {
		return Hello{}, fmt.Errorf("iid is empty")
	}
	if h.Role, err = d.name("role"); err != nil {
		return Hello{}, err
	}
	count, err := d.uint16("channel count")
	if err != nil {
		return Hello{}, err
	}
	if count > MaxChannels {
		return Hello{}, fmt.Errorf("channel count %d exceeds %d", count, MaxChannels)
	}
	// Each name takes at least two bytes, which bounds the slice by the
	// body we already hold, whatever count claims.
	if int(count)*2 > len(d.b) {
		return Hello{}, fmt.Errorf("channel count %d does not fit in the remaining %d bytes", count, len(d.b))
	}
	seen := make(map[string]bool, count)
	h.Channels = make([]string, 0, count)
	for i := range int(count) {
		c, err := d.name(fmt.Sprintf("channel %d name", i))
		if err != nil {
			return Hello{}, err
		}
		if c == "" {
			return Hello{}, fmt.Errorf("channel %d name is empty", i)
		}
		if seen[c] {
			return Hello{}, fmt.Errorf("channel %q listed twice", c)
		}
		seen[c] = true
		h.Channels = append(h.Channels, c)
	}
	if len(d.b) != 0 {
		return Hello{}, fmt.Errorf("%d trailing bytes after the channel list", len(d.b))
	}
	return h, nil
}

// decoder consumes a bounded body.
type decoder struct{ b []byte }

func (d *decoder) name(what string) (string, error) {
	if len(d.b) < 1 {
		return "", fmt.Errorf("%s length: truncated", what)
	}
	n := int(d.b[0])
	if len(d.b) < 1+n {
		return "", fmt.Errorf("%s: length %d exceeds the remaining %d bytes", what, n, len(d.b)-1)
	}
	s := string(d.b[1 : 1+n])
	d.b = d.b[1+n:]
	return s, nil
}

func (d *decoder) uint16(what string) (uint16, error) {
	if len(d.b) < 2 {
		return 0, fmt.Errorf("%s: truncated", what)
	}
	v := binary.BigEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v, nil
}
