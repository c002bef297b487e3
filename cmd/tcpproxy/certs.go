package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// cmdCerts makes a development CA (once) and instance certificates:
//
//	tcpproxy certs -dir certs web-1:web cache-1:cache
//
// With -spiffe, the certificates are X.509 SVIDs of that trust domain, as
// SPIRE or cert-manager's csi-driver-spiffe would issue them.
func cmdCerts(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "certs", "directory for ca.pem, ca-key.pem and <iid>.pem, <iid>-key.pem")
	hosts := fs.String("hosts", "", "comma-separated extra DNS names or IPs for every certificate (tcpproxy itself checks only the instance identity)")
	validity := fs.Duration("validity", 365*24*time.Hour, "certificate validity")
	trustDomain := fs.String("spiffe", "", "make X.509 SVIDs of this SPIFFE trust domain (e.g. example.org) instead of tcpproxy instance URIs")
	template := fs.String("spiffe-template", "/ns/{role}/sa/{iid}", "with -spiffe: the SPIFFE ID path of an instance (tls.spiffe.idTemplate)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tcpproxy certs [-dir DIR] [-hosts H1,H2] [-spiffe TRUST_DOMAIN [-spiffe-template PATH]] IID:ROLE...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return usageError{errors.New("name at least one instance as IID:ROLE")}
	}
	var ids []pki.Identity
	for _, a := range fs.Args() {
		iid, role, ok := strings.Cut(a, ":")
		if !ok || iid == "" || role == "" {
			return usageError{fmt.Errorf("instance %q: want IID:ROLE", a)}
		}
		ids = append(ids, pki.Identity{IID: iid, Role: role})
	}
	var spiffe *pki.SPIFFEMapping
	if *trustDomain != "" {
		var err error
		if spiffe, err = pki.NewSPIFFEMapping(*trustDomain, *template); err != nil {
			return usageError{fmt.Errorf("-spiffe: %w", err)}
		}
		for _, id := range ids {
			if _, err := spiffe.ID(id); err != nil {
				return usageError{fmt.Errorf("instance %s:%s: %w", id.IID, id.Role, err)}
			}
		}
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	ca, err := pki.LoadCA(*dir)
	if errors.Is(err, os.ErrNotExist) {
		if ca, err = pki.NewCA("tcpproxy development CA", *validity); err != nil {
			return err
		}
		if err := ca.Save(*dir); err != nil {
			return fmt.Errorf("save CA: %w", err)
		}
		fmt.Fprintf(stdout, "new CA: %s/ca.pem\n", *dir)
	} else if err != nil {
		return err
	}
	var extra []string
	if *hosts != "" {
		extra = strings.Split(*hosts, ",")
	}
	for _, id := range ids {
		write := ca.WriteInstance
		if spiffe != nil {
			write = func(dir string, id pki.Identity, hosts []string, validity time.Duration) (string, string, error) {
				return ca.WriteSVID(dir, spiffe, id, hosts, validity)
			}
		}
		cert, key, err := write(*dir, id, extra, *validity)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: %s %s\n", id, cert, key)
	}
	if spiffe != nil {
		fmt.Fprintf(stdout, "configure: tls: {cert: ..., key: ..., ca: %s/ca.pem, spiffe: {trustDomain: %s, idTemplate: %q}}\n", *dir, *trustDomain, *template)
	}
	return nil
}
