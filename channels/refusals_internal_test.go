package channels

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRefusalLogIntervals: the first refusal from an address is logged at
// once, the next ones in a summary per interval, and an address quiet for
// an interval is logged at once again.
func TestRefusalLogIntervals(t *testing.T) {
	var buf bytes.Buffer
	l := newRefusalLog(slog.New(slog.NewTextHandler(&buf, nil)))
	lines := func() []string {
		s := strings.TrimSpace(buf.String())
		buf.Reset()
		if s == "" {
			return nil
		}
		return strings.Split(s, "\n")
	}
	r := Refusal{Reason: RefusedNotMember, Remote: "10.0.0.9:4000", Claimed: "evil", Err: errors.New("not a member")}

	l.add("10.0.0.9", r)
	got := lines()
	require.Len(t, got, 1)
	assert.Contains(t, got[0], `msg="session refused" reason=not_member remote=10.0.0.9:4000 claimed_iid=evil err="not a member"`)

	for range 5 {
		l.add("10.0.0.9", r)
	}
	l.add("10.0.0.9", Refusal{Stream: true, Reason: RefusedChannel, Remote: "10.0.0.9:4001", Claimed: "evil", Err: errors.New("no channel")})
	require.Empty(t, lines(), "counted, not logged")
	l.flush()
	got = lines()
	require.Len(t, got, 1)
	assert.Contains(t, got[0], `msg="refused again" from=10.0.0.9 sessions=5 streams=1`)
	assert.Contains(t, got[0], `reasons="channel=1 not_member=5" last_remote=10.0.0.9:4001 last_claimed_iid=evil last_err="no channel"`)

	l.add("10.0.0.9", r) // within the next interval: counted
	require.Empty(t, lines())
	l.flush()
	require.Len(t, lines(), 1)
	l.flush() // a quiet interval: forgotten, nothing logged
	require.Empty(t, lines())
	require.Empty(t, l.addrs)
	l.add("10.0.0.9", r)
	require.Len(t, lines(), 1, "logged at once again")
}
