package interop

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
)

// TestManualCertReload: a --certmode manual relay whose certificate files are
// replaced serves the new certificate without a restart. Tailscale's derphttp
// clients connected before keep relaying on the same connections; a client
// that pins only the new certificate connects, and finds derper's meta
// certificate after it (fast start).
func TestManualCertReload(t *testing.T) {
	first, second := newTestCert(t), newTestCert(t)
	relay := startRelay(t, "r1", relayOptions{Cert: first, Workers: 1, CertReloadInterval: "0.2"})
	ctx := testContext(t, 60*time.Second)
	serverKey, err := relay.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	a := regionClient(t, "a", relay.Node("900a"))
	b := regionClient(t, "b", relay.Node("900a"))
	ra := startReceiver(t, "a", a)
	rb := startReceiver(t, "b", b)
	ra.next(ctx, "ServerInfo", isServerInfo)
	rb.next(ctx, "ServerInfo", isServerInfo)
	sendAndExpect(t, a, b, rb, 1200)

	second.replace(t, filepath.Join(relay.dir, "certs"))
	relay.Status.CertName = second.CertName // what the DERP map (and our scrapes) pin from now on
	var c *derphttp.Client
	err = waitFor(ctx, "a client pinning the new certificate", func() bool {
		c = regionClient(t, "c", relay.Node("900a"))
		if err := c.Connect(ctx); err != nil {
			c.Close()
			return false
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	checkMetaCert(t, c, serverKey)

	sendAndExpect(t, a, b, rb, 1200)
	sendAndExpect(t, b, a, ra, 1200)
	if got := relay.metric(t, "derp_accepts_total"); got != 3 {
		t.Errorf("derp_accepts_total = %v, want 3: the pair kept its connections, c is the only new one", got)
	}
	if got := relay.metric(t, `derp_tls_cert_reloads_total{result="reloaded"}`); got != 1 {
		t.Errorf(`derp_tls_cert_reloads_total{result="reloaded"} = %v, want 1`, got)
	}
	if got, want := relay.metric(t, "derp_tls_cert_not_after_unix_time"), float64(second.NotAfter.Unix()); got != want {
		t.Errorf("derp_tls_cert_not_after_unix_time = %v, want the new certificate's %v", got, want)
	}
}

// replace puts the pair in place of the files install wrote, each by a rename
// (a reader sees a whole old or a whole new file, never a part of one).
func (c *testCert) replace(t testing.TB, dir string) {
	t.Helper()
	staging := t.TempDir()
	c.install(t, staging)
	for _, name := range []string{"127.0.0.1.key", "127.0.0.1.crt"} {
		if err := os.Rename(filepath.Join(staging, name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}
