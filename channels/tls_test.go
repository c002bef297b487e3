package channels_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// TestTLSRefusesWrongIdentity: a certificate from the mesh CA is not
// enough; it must name the instance (and role) the peer claims to be, on
// both ends of the session.
func TestTLSRefusesWrongIdentity(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.NewCA("test CA", time.Hour)
	require.NoError(t, err)
	require.NoError(t, ca.Save(dir))
	caFile := filepath.Join(dir, "ca.pem")
	cfgFor := func(id pki.Identity) func(*channels.Config) {
		return func(c *channels.Config) {
			cert, key, err := ca.WriteInstance(t.TempDir(), id, nil, time.Hour)
			require.NoError(t, err)
			c.TLS, err = channels.TLSConfigFromFiles(cert, key, caFile)
			require.NoError(t, err)
		}
	}
	for _, tc := range []struct {
		name         string
		client, serv pki.Identity
		want         string
	}{
		{"client claims another iid", pki.Identity{IID: "mallory", Role: "test"}, pki.Identity{IID: "b", Role: "test"},
			`handshake says instance "a" (role "test") but certificate is for instance "mallory"`},
		{"client claims another role", pki.Identity{IID: "a", Role: "admin"}, pki.Identity{IID: "b", Role: "test"},
			`certificate is for instance "a" (role "admin")`},
		{"server is not the member dialed", pki.Identity{IID: "a", Role: "test"}, pki.Identity{IID: "x", Role: "test"},
			`certificate is for instance "x" (role "test"), not instance "b"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := cfgFor(tc.client), cfgFor(tc.serv)
			req, _, _, _ := pair(t, nil, func(c *channels.Config) {
				if c.IID == "a" {
					client(c)
				} else {
					server(c)
				}
			})
			_, _, err := req.Open(context.Background(), channels.Header{})
			require.ErrorIs(t, err, channels.ErrNoMembers)
			require.ErrorContains(t, err, tc.want)
		})
	}
	// And the matching identities work.
	req, reply, _, _ := pair(t, nil, func(c *channels.Config) { cfgFor(pki.Identity{IID: c.IID, Role: "test"})(c) })
	s, in := open(t, req, reply)
	defer s.Close()
	defer in.Stream.Close()
}
