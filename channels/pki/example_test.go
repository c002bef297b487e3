package pki_test

import (
	"fmt"
	"log"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// A SPIFFE ID template maps the IDs that SPIRE or cert-manager's
// csi-driver-spiffe issue to tcpproxy instances, and back.
func ExampleSPIFFEMapping() {
	m, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	if err != nil {
		log.Fatal(err)
	}
	id, err := m.Identity(spiffeid.RequireFromString("spiffe://example.org/ns/cache/sa/cache-0"))
	fmt.Println(id, err)
	_, err = m.Identity(spiffeid.RequireFromString("spiffe://other.org/ns/cache/sa/cache-0"))
	fmt.Println(err)
	sid, err := m.ID(pki.Identity{IID: "web-1", Role: "web"})
	fmt.Println(sid, err)
	// Output:
	// instance "cache-0" (role "cache") <nil>
	// SPIFFE ID spiffe://other.org/ns/cache/sa/cache-0 is not in trust domain example.org
	// spiffe://example.org/ns/web/sa/web-1 <nil>
}
