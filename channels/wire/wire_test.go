package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestStreamHeaderRoundTrip(t *testing.T) {
	for _, h := range []StreamHeader{
		{Channel: "c", SourceIID: "i"},
		{Channel: "peers", SourceIID: "etcd-0", SourcePort: 54321, TargetPort: 2380},
		{Channel: strings.Repeat("c", MaxNameLen), SourceIID: strings.Repeat("i", MaxNameLen), SourcePort: 65535, TargetPort: 65535},
	} {
		var buf bytes.Buffer
		require.NoError(t, WriteStreamHeader(&buf, h))
		assert.LessOrEqual(t, buf.Len(), MaxStreamHeaderSize)
		buf.WriteString("payload")
		got, err := ReadStreamHeader(&buf)
		require.NoError(t, err)
		assert.Equal(t, h, got)
		assert.Equal(t, "payload", buf.String(), "the decoder must not read past the header")
	}
}

func TestStreamHeaderErrors(t *testing.T) {
	_, err := AppendStreamHeader(nil, StreamHeader{Channel: strings.Repeat("c", 256), SourceIID: "i"})
	require.ErrorContains(t, err, "stream header: channel name length 256 exceeds 255")
	_, err = AppendStreamHeader(nil, StreamHeader{Channel: "c"})
	require.ErrorContains(t, err, "source iid is empty")

	for name, tc := range map[string]struct {
		in   []byte
		want string
	}{
		"empty":           {nil, "read version: EOF"},
		"version":         {[]byte{Version + 1, 1, 'c'}, fmt.Sprintf("stream header: protocol version %d not supported (this node speaks %d)", Version+1, Version)},
		"empty channel":   {[]byte{Version, 0}, "channel name is empty"},
		"short channel":   {[]byte{Version, 5, 'a', 'b'}, "read channel name (5 bytes): unexpected EOF"},
		"empty iid":       {[]byte{Version, 1, 'c', 0}, "source iid is empty"},
		"truncated ports": {[]byte{Version, 1, 'c', 1, 'i', 0, 1, 0}, "unexpected EOF"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ReadStreamHeader(bytes.NewReader(tc.in))
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err = ReadStreamHeader(bytes.NewReader([]byte{9}))
	require.Error(t, err)
	_, err = ReadStreamHeader(bytes.NewReader([]byte{9, 1, 'c'}))
	require.ErrorIs(t, err, ErrVersion)
}

func TestHandshakeRoundTrip(t *testing.T) {
	many := make([]string, MaxChannels)
	for i := range many {
		many[i] = fmt.Sprintf("channel-%04d-%s", i, strings.Repeat("x", 40)) // ~55 KiB in all
	}
	for _, h := range []Hello{
		{IID: "a"},
		{IID: "a-1", Role: "frontend", Channels: []string{"peers", "db"}},
		{IID: strings.Repeat("i", 255), Role: strings.Repeat("r", 255), Channels: many},
	} {
		var buf bytes.Buffer
		require.NoError(t, WriteHello(&buf, h))
		assert.LessOrEqual(t, buf.Len(), MaxHandshakeSize)
		buf.WriteString("yamux")
		got, err := ReadHello(&buf)
		require.NoError(t, err)
		if h.Channels == nil {
			h.Channels = []string{}
		}
		assert.Equal(t, h, got)
		assert.Equal(t, "yamux", buf.String(), "the decoder must not read past the frame")

		buf.Reset()
		require.NoError(t, WriteReply(&buf, Reply{Accepted: true, Hello: h}))
		rp, err := ReadReply(&buf)
		require.NoError(t, err)
		assert.Equal(t, Reply{Accepted: true, Hello: h}, rp)
	}

	var buf bytes.Buffer
	require.NoError(t, WriteReply(&buf, Reply{Reason: "go away"}))
	rp, err := ReadReply(&buf)
	require.NoError(t, err)
	assert.Equal(t, Reply{Reason: "go away"}, rp)

	buf.Reset()
	require.NoError(t, WriteReply(&buf, Reply{Reason: strings.Repeat("r", 5000)}))
	rp, err = ReadReply(&buf)
	require.NoError(t, err)
	assert.Len(t, rp.Reason, MaxReasonLen, "long reasons are cut")
}

func TestHandshakeLimits(t *testing.T) {
	tooMany := make([]string, MaxChannels+1)
	for i := range tooMany {
		tooMany[i] = string(rune('a' + i))
	}
	big := make([]string, 300)
	for i := range big {
		big[i] = strings.Repeat("n", 250) + string(rune('a'+i))
	}
	for name, tc := range map[string]struct {
		h    Hello
		want string
	}{
		"no iid":        {Hello{}, "iid is empty"},
		"long role":     {Hello{IID: "a", Role: strings.Repeat("r", 256)}, "role length 256 exceeds 255"},
		"many channels": {Hello{IID: "a", Channels: tooMany}, "channel count 1025 exceeds 1024"},
		"empty channel": {Hello{IID: "a", Channels: []string{""}}, "channel 0 name is empty"},
		"duplicate":     {Hello{IID: "a", Channels: []string{"x", "x"}}, `channel "x" listed twice`},
		"too big":       {Hello{IID: "a", Channels: big}, "exceeds 65536"},
	} {
		t.Run(name, func(t *testing.T) {
			err := WriteHello(io.Discard, tc.h)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// frame builds a raw handshake frame.
func frame(version, typ uint8, body []byte) []byte {
	b := append(Magic[:0:0], Magic[:]...)
	b = append(b, version, typ, byte(len(body)>>8), byte(len(body)))
	return append(b, body...)
}

func TestHandshakeDecodeErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		in   []byte
		want string
	}{
		"http":            {[]byte("GET / HTTP/1.1\r\n"), `handshake: bad magic "GET "`},
		"short garbage":   {[]byte("GE"), `bad magic "GE"`},
		"truncated":       {Magic[:3], "read prefix: unexpected EOF"},
		"eof":             {nil, "read prefix: EOF"},
		"version":         {frame(7, frameHello, []byte{1, 'a', 0, 0, 0}), "protocol version 7 not supported"},
		"type":            {frame(Version, frameAccept, []byte{1, 'a', 0, 0, 0}), "frame type 2 is not a hello"},
		"short body":      {frame(Version, frameHello, []byte{1, 'a'})[:9], "read body (2 bytes): unexpected EOF"},
		"empty iid":       {frame(Version, frameHello, []byte{0, 0, 0, 0}), "iid is empty"},
		"iid overrun":     {frame(Version, frameHello, []byte{9, 'a'}), "iid: length 9 exceeds the remaining 1 bytes"},
		"count":           {frame(Version, frameHello, []byte{1, 'a', 0, 0x04, 0x01}), "channel count 1025 exceeds 1024"},
		"count overrun":   {frame(Version, frameHello, []byte{1, 'a', 0, 0, 5, 1, 'x'}), "channel count 5 does not fit"},
		"trailing":        {frame(Version, frameHello, []byte{1, 'a', 0, 0, 0, 'z'}), "1 trailing bytes"},
		"dup channel":     {frame(Version, frameHello, []byte{1, 'a', 0, 0, 2, 1, 'x', 1, 'x'}), `channel "x" listed twice`},
		"length too long": {append(Magic[:0:0], 'T', 'C', 'P', 'X', Version, frameHello, 0xff, 0xff), "body length 65535 exceeds 65528"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ReadHello(bytes.NewReader(tc.in))
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err := ReadHello(bytes.NewReader(frame(7, frameHello, nil)))
	var verr *VersionError
	require.True(t, errors.As(err, &verr))
	assert.Equal(t, uint8(7), verr.Got)
}

func TestReplyAcrossVersions(t *testing.T) {
	// A listener of another version rejects us: we still learn why.
	rp, err := ReadReply(bytes.NewReader(frame(Version+1, frameReject, []byte("upgrade me"))))
	require.NoError(t, err)
	assert.False(t, rp.Accepted)
	assert.Equal(t, fmt.Sprintf("upgrade me (peer speaks protocol version %d)", Version+1), rp.Reason)
	// ... but an acceptance we cannot read is an error.
	_, err = ReadReply(bytes.NewReader(frame(Version+1, frameAccept, []byte{1, 'b', 0, 0, 0})))
	require.ErrorIs(t, err, ErrVersion)
	_, err = ReadReply(bytes.NewReader(frame(Version, frameHello, []byte{1, 'b', 0, 0, 0})))
	require.ErrorContains(t, err, "neither accept nor reject")
}

func FuzzHeader(f *testing.F) {
	for _, h := range []StreamHeader{
		{Channel: "c", SourceIID: "i"},
		{Channel: "peers", SourceIID: "etcd-0", SourcePort: 54321, TargetPort: 2380},
	} {
		b, err := AppendStreamHeader(nil, h)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{Version, 255})
	f.Add([]byte{Version, 1, 'c', 255, 'i'})
	f.Add([]byte{2, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadStreamHeader(bytes.NewReader(data))
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to the bytes it came from.
		b, err := AppendStreamHeader(nil, h)
		require.NoError(t, err)
		require.Equal(t, data[:len(b)], b)
	})
}

func FuzzHandshake(f *testing.F) {
	var buf bytes.Buffer
	_ = WriteHello(&buf, Hello{IID: "a-1", Role: "frontend", Channels: []string{"peers", "db"}})
	f.Add(buf.Bytes())
	buf.Reset()
	_ = WriteReply(&buf, Reply{Accepted: true, Hello: Hello{IID: "b"}})
	f.Add(buf.Bytes())
	buf.Reset()
	_ = WriteReply(&buf, Reply{Reason: "no"})
	f.Add(buf.Bytes())
	f.Add(frame(Version, frameHello, []byte{1, 'a', 0, 0xff, 0xff}))
	f.Add(frame(9, frameReject, []byte("x")))
	f.Add([]byte("TCPX"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if h, err := ReadHello(bytes.NewReader(data)); err == nil {
			var out bytes.Buffer
			require.NoError(t, WriteHello(&out, h))
			require.Equal(t, data[:out.Len()], out.Bytes(), "hello must re-encode identically")
		}
		if rp, err := ReadReply(bytes.NewReader(data)); err == nil && rp.Accepted {
			var out bytes.Buffer
			require.NoError(t, WriteReply(&out, rp))
			require.Equal(t, data[:out.Len()], out.Bytes(), "reply must re-encode identically")
		}
	})
}
