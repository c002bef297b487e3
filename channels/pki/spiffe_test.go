package pki

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSPIFFEMappingRoundTrip(t *testing.T) {
	m, err := NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	assert.True(t, m.HasRole())
	id := Identity{IID: "cache-0", Role: "prod"}
	sid, err := m.ID(id)
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/ns/prod/sa/cache-0", sid.String())
	back, err := m.Identity(sid)
	require.NoError(t, err)
	assert.Equal(t, id, back)
}

func TestSPIFFEMappingWithoutRole(t *testing.T) {
	m, err := NewSPIFFEMapping("example.org", "/tcpproxy/{iid}")
	require.NoError(t, err)
	assert.False(t, m.HasRole())
	got, err := m.Identity(spiffeid.RequireFromString("spiffe://example.org/tcpproxy/web-1"))
	require.NoError(t, err)
	assert.Equal(t, Identity{IID: "web-1"}, got)
	// The certificate attests the instance only: any role matches, but
	// not another instance.
	require.NoError(t, Match(got, Identity{IID: "web-1", Role: "web"}))
	require.ErrorContains(t, Match(got, Identity{IID: "web-2", Role: "web"}), `not instance "web-2"`)
}

func TestSPIFFEMappingRefuses(t *testing.T) {
	m, err := NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	require.NoError(t, err)
	for _, tc := range []struct{ id, want string }{
		{"spiffe://other.org/ns/prod/sa/a", "is not in trust domain example.org"},
		{"spiffe://example.org/ns/prod/a", "does not match the ID template /ns/{role}/sa/{iid}"},
		{"spiffe://example.org/ns/prod/sa/a/b", "does not match the ID template"},
		{"spiffe://example.org/nz/prod/sa/a", "does not match the ID template"},
		{"spiffe://example.org", "does not match the ID template"},
	} {
		_, err := m.Identity(spiffeid.RequireFromString(tc.id))
		require.ErrorContains(t, err, tc.want, tc.id)
	}
	_, err = m.ID(Identity{IID: "has space", Role: "r"})
	require.ErrorContains(t, err, `iid "has space" cannot be a SPIFFE ID path segment`)
	_, err = m.ID(Identity{IID: "a", Role: ""})
	require.ErrorContains(t, err, `role "" cannot be a SPIFFE ID path segment`)
}

func TestSPIFFEMappingInvalid(t *testing.T) {
	for _, tc := range []struct{ td, tmpl, want string }{
		{"", "/{iid}", "trust domain"},
		{"Example.org", "/{iid}", "trust domain"},
		{"spiffe://example.org", "/{iid}", "give the name only"},
		{"example.org", "{iid}", "must start with /"},
		{"example.org", "/ns/{role}", "has no {iid} segment"},
		{"example.org", "/{iid}/{iid}", "{iid} appears more than once"},
		{"example.org", "/sa-{iid}", "must be a whole path segment"},
		{"example.org", "/{id}", "must be a whole path segment"},
		{"example.org", "/a//{iid}", "segment \"\""},
		{"example.org", "/a b/{iid}", "segment \"a b\""},
	} {
		_, err := NewSPIFFEMapping(tc.td, tc.tmpl)
		require.ErrorContains(t, err, tc.want, "%s %s", tc.td, tc.tmpl)
	}
}
