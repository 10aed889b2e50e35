package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// benchHost is the TLS name and listen address of both servers: with
// --certmode manual both load <certdir>/<benchHost>.crt and .key.
const benchHost = "127.0.0.1"

// benchCert is the one self-signed certificate both servers serve, so the
// TLS work (curve, signature, record sizes) is the same for both.
type benchCert struct {
	certPEM, keyPEM []byte
	pin             string // sha256 of the DER certificate, hex: the DERP map CertName
}

func newBenchCert() (*benchCert, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := crand.Int(crand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "derpfleet-bench"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{net.ParseIP(benchHost)},
	}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(der)
	return &benchCert{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		pin:     hex.EncodeToString(sum[:]),
	}, nil
}

// install writes the pair under the names derper's --certmode manual expects.
func (c *benchCert) install(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, benchHost+".crt"), c.certPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, benchHost+".key"), c.keyPEM, 0o600)
}

// tlsConfig trusts exactly this certificate, as a DERP map CertName pin does.
func (c *benchCert) tlsConfig() *tls.Config {
	return &tls.Config{
		InsecureSkipVerify: true, // replaced by the pin check
		NextProtos:         []string{"http/1.1"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no peer certificate")
			}
			sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if got := hex.EncodeToString(sum[:]); got != c.pin {
				return fmt.Errorf("certificate sha256 %s, want %s", got, c.pin)
			}
			return nil
		},
	}
}
