package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpproxy/tcpproxy/channels"
)

// tlsSuite is the TLS 1.3 cipher suite tcpproxy's sessions negotiate on
// this machine (Go picks AES-GCM where the CPU accelerates AES, else
// ChaCha20-Poly1305), with its name in Go and in OpenSSL, and its AEAD.
type tlsSuite struct {
	id      uint16
	name    string // Go's name, e.g. TLS_AES_128_GCM_SHA256
	openssl string // OpenSSL's TLS 1.3 ciphersuite name (the same here)
	aead    func() (cipher.AEAD, error)
}

// negotiatedSuite runs a mutual TLS handshake in memory with the
// configuration tcpproxy builds from the bench's certificates, and returns
// the suite the two sides agreed on.
func negotiatedSuite(c *certFiles) (tlsSuite, error) {
	cliCfg, _, err := benchTLSConfigs(c.cert("bench-cli"), c.key("bench-cli"), c.ca)
	if err != nil {
		return tlsSuite{}, err
	}
	_, srvCfg, err := benchTLSConfigs(c.cert("bench-srv"), c.key("bench-srv"), c.ca)
	if err != nil {
		return tlsSuite{}, err
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	errc := make(chan error, 1)
	go func() {
		s := tls.Server(b, srvCfg)
		errc <- s.Handshake()
	}()
	cl := tls.Client(a, cliCfg)
	if err := cl.Handshake(); err != nil {
		return tlsSuite{}, fmt.Errorf("in-memory TLS handshake: %w", err)
	}
	if err := <-errc; err != nil {
		return tlsSuite{}, fmt.Errorf("in-memory TLS handshake: %w", err)
	}
	id := cl.ConnectionState().CipherSuite
	s := tlsSuite{id: id, name: tls.CipherSuiteName(id), openssl: tls.CipherSuiteName(id)}
	switch id {
	case tls.TLS_AES_128_GCM_SHA256:
		s.aead = func() (cipher.AEAD, error) { return gcm(16) }
	case tls.TLS_AES_256_GCM_SHA384:
		s.aead = func() (cipher.AEAD, error) { return gcm(32) }
	default:
		// ChaCha20-Poly1305 (CPUs without AES instructions) is not in the
		// standard library's public API: the cost is not measured.
	}
	return s, nil
}

// benchTLSConfigs are the client and server sides of mutual TLS with the
// credentials in the files, as tcpproxy configures its sessions: TLS 1.3,
// the peer's chain verified against the CA (host names are not checked).
func benchTLSConfigs(certFile, keyFile, caFile string) (client, server *tls.Config, err error) {
	cr, err := channels.TLSConfigFromFiles(certFile, keyFile, caFile)
	if err != nil {
		return nil, nil, err
	}
	mat := cr.Current()
	verify := func(usage x509.ExtKeyUsage) func(tls.ConnectionState) error {
		return func(cs tls.ConnectionState) error {
			_, err := mat.Verify(cs.PeerCertificates, usage)
			return err
		}
	}
	certs := []tls.Certificate{*mat.Certificate()}
	client = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: certs, InsecureSkipVerify: true,
		VerifyConnection: verify(x509.ExtKeyUsageServerAuth)}
	server = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: certs, ClientAuth: tls.RequireAnyClientCert,
		VerifyConnection: verify(x509.ExtKeyUsageClientAuth)}
	return client, server, nil
}

func gcm(keyLen int) (cipher.AEAD, error) {
	b, err := aes.NewCipher(make([]byte, keyLen))
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// tlsRecord is the plaintext of a full TLS record.
const tlsRecord = 16 << 10

// sealOpenCost is the CPU time one core spends sealing and then opening
// size bytes in full TLS records with s's AEAD, in place as crypto/tls
// does, scaled to seconds per GiB. It is the thread's own CPU time
// (RUSAGE_THREAD), so other load on the machine does not inflate it.
func sealOpenCost(s tlsSuite, size int64) (float64, error) {
	if s.aead == nil {
		return 0, fmt.Errorf("the cost of %s is not measured", s.name)
	}
	aead, err := s.aead()
	if err != nil {
		return 0, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf := make([]byte, tlsRecord+aead.Overhead())
	nonce := make([]byte, aead.NonceSize())
	ad := make([]byte, 5)
	records := size / tlsRecord
	// Warm up (and fault in the buffer) outside the measurement.
	sealed := aead.Seal(buf[:0], nonce, buf[:tlsRecord], ad)
	if _, err := aead.Open(buf[:0], nonce, sealed, ad); err != nil {
		return 0, err
	}
	t0, err := threadCPU()
	if err != nil {
		return 0, err
	}
	for i := range records {
		nonce[0] = byte(i)
		sealed := aead.Seal(buf[:0], nonce, buf[:tlsRecord], ad)
		if _, err := aead.Open(buf[:0], nonce, sealed, ad); err != nil {
			return 0, err
		}
	}
	t1, err := threadCPU()
	if err != nil {
		return 0, err
	}
	return (t1 - t0).Seconds() * float64(1<<30) / float64(records*tlsRecord), nil
}

// threadCPU is the calling thread's CPU time (user and system).
func threadCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
