package proxy

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInstanceIPsAreStableAndInRange(t *testing.T) {
	a := NewInstanceAllocator(DefaultInstanceRange)
	b := NewInstanceAllocator(DefaultInstanceRange)
	first, last := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.255.254")
	for i := range 500 {
		iid := fmt.Sprintf("instance-%d", i)
		ipA, err := a.Add(iid)
		require.NoError(t, err)
		assert.True(t, ipA.Compare(first) >= 0 && ipA.Compare(last) <= 0, "%s out of range", ipA)
		got, ok := a.IIDOf(ipA)
		assert.True(t, ok)
		assert.Equal(t, iid, got)
	}
	// Another proxy assigning the same set at once, in another order,
	// agrees on every address.
	var ids []string
	for i := 499; i >= 0; i-- {
		ids = append(ids, fmt.Sprintf("instance-%d", i))
	}
	_, err := b.Assign(ids)
	require.NoError(t, err)
	for _, iid := range ids {
		ipA, _ := a.Lookup(iid)
		ipB, _ := b.Lookup(iid)
		assert.Equal(t, ipA, ipB, iid)
	}
}

func TestInstanceIPsCollisionFreeAndExhaustion(t *testing.T) {
	// A /29 has 8 addresses, 5 usable: collisions are certain.
	a := NewInstanceAllocator(netip.MustParsePrefix("127.0.0.0/29"))
	seen := map[netip.Addr]string{}
	var collided int
	for i := range 5 {
		iid := fmt.Sprintf("i%d", i)
		c, err := a.Ensure(iid)
		require.NoError(t, err)
		collided += len(c)
		ip, ok := a.Lookup(iid)
		require.True(t, ok)
		require.NotContains(t, seen, ip, "address given twice")
		seen[ip] = iid
	}
	assert.Positive(t, collided)
	_, err := a.Add("one-too-many")
	require.ErrorIs(t, err, ErrAddressesExhausted)
	assert.Contains(t, err.Error(), "one-too-many")
	// Releasing one makes room again, and existing members keep theirs.
	before, _ := a.Lookup("i1")
	_, err = a.Assign([]string{"i1", "i2", "i3", "i4"})
	require.NoError(t, err)
	_, err = a.Add("one-too-many")
	require.NoError(t, err)
	after, _ := a.Lookup("i1")
	assert.Equal(t, before, after)
}

func TestRequestIPs(t *testing.T) {
	ips, err := RequestIPs(DefaultRequestRange, []string{"zeta", "alpha"})
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("127.1.0.1"), ips["alpha"])
	assert.Equal(t, netip.MustParseAddr("127.1.0.2"), ips["zeta"])
	_, err = RequestIPs(netip.MustParsePrefix("127.1.0.0/30"), []string{"a", "b", "c"})
	require.ErrorIs(t, err, ErrAddressesExhausted)
}

func TestAddressingValidate(t *testing.T) {
	require.NoError(t, Addressing{}.Validate())
	for _, tc := range []struct {
		a    Addressing
		want string
	}{
		{Addressing{InstanceRange: netip.MustParsePrefix("10.0.0.0/16")}, "not an IPv4 prefix inside 127.0.0.0/8"},
		{Addressing{InstanceRange: netip.MustParsePrefix("127.1.0.0/16")}, "overlaps"},
		{Addressing{RequestRange: netip.MustParsePrefix("127.9.0.0/31")}, "too small"},
	} {
		err := tc.a.Validate()
		require.Error(t, err)
		assert.Contains(t, err.Error(), tc.want)
	}
}
