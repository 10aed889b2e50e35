package interop

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testCert is a self-signed certificate for 127.0.0.1 that the tests make
// for relays whose certificate must be known before they start (meshes:
// every member trusts the others through a CA bundle of these).
type testCert struct {
	CertPEM  []byte
	KeyPEM   []byte
	CertName string // "sha256-raw:<hex>" pin for the DERP map
	NotAfter time.Time
}

func newTestCert(t testing.TB) *testCert {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := crand.Int(crand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// A distinct subject per certificate: OpenSSL (our relay's mesh
		// client) picks a trust anchor by subject name, so two anchors both
		// named "127.0.0.1" in one bundle would shadow each other.
		Subject:               pkix.Name{CommonName: "interop-" + serial.Text(36)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour), // past the prober's 7-day expiry warning
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true, // it is its own trust anchor in the mesh CA bundle
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	return &testCert{
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		CertName: "sha256-raw:" + hex.EncodeToString(sum[:]),
		NotAfter: tmpl.NotAfter,
	}
}

// install writes the pair as <dir>/127.0.0.1.crt and .key, the names both
// derper's and our relay's --certmode manual look for.
func (c *testCert) install(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "127.0.0.1.crt"), c.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "127.0.0.1.key"), c.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeCABundle writes the certificates into one PEM file and returns its path.
func writeCABundle(t testing.TB, certs ...*testCert) string {
	t.Helper()
	var b []byte
	for _, c := range certs {
		b = append(b, c.CertPEM...)
	}
	path := filepath.Join(t.TempDir(), "mesh-ca.pem")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}
