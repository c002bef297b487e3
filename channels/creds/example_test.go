package creds_test

import (
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/tcpproxy/tcpproxy/channels"
	"github.com/tcpproxy/tcpproxy/channels/creds"
	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// Credentials from files that cert-manager (or `tcpproxy certs`) keeps
// current, with X.509 SVIDs mapped to instances by a SPIFFE ID template,
// given to a node: every new session handshake uses the newest
// certificate and CA bundle.
func ExampleWatchFiles() {
	dir, err := os.MkdirTemp("", "creds-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// A development CA and an SVID for instance web-1 of role web.
	spiffe, err := pki.NewSPIFFEMapping("example.org", "/ns/{role}/sa/{iid}")
	if err != nil {
		log.Fatal(err)
	}
	ca, err := pki.NewCA("example CA", 24*time.Hour)
	if err != nil {
		log.Fatal(err)
	}
	self := pki.Identity{IID: "web-1", Role: "web"}
	certFile, keyFile, err := ca.WriteSVID(dir, spiffe, self, nil, time.Hour)
	if err != nil {
		log.Fatal(err)
	}
	if err := ca.Save(dir); err != nil {
		log.Fatal(err)
	}

	files, err := creds.WatchFiles(creds.FilesConfig{
		Cert: certFile, Key: keyFile, CA: dir + "/ca.pem",
		SPIFFE:  spiffe,
		Options: creds.Options{Self: &self, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer files.Close()
	fmt.Println(files.Current().Identity())
	fmt.Println(files.Current().Leaf().URIs[0])

	node, err := channels.NewNode(channels.Config{IID: self.IID, Role: self.Role, ListenAddr: "127.0.0.1:0", TLS: files})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	// Output:
	// instance "web-1" (role "web")
	// spiffe://example.org/ns/web/sa/web-1
}
