package interop

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// endpointCase is one plain HTTP request that Tailscale clients (netcheck,
// captive-portal detection, browsers) make to a DERP server.
type endpointCase struct {
	name, method, path string
	header             map[string]string
	// compare lists the response headers that must match derper's.
	compare []string
	// body compares the response bodies too.
	body bool
}

var endpointCases = []endpointCase{
	{name: "probe", method: "GET", path: "/derp/probe", compare: []string{"Access-Control-Allow-Origin"}},
	{name: "probe-head", method: "HEAD", path: "/derp/probe", compare: []string{"Access-Control-Allow-Origin"}},
	{name: "latency-check", method: "GET", path: "/derp/latency-check", compare: []string{"Access-Control-Allow-Origin"}},
	{name: "probe-bad-method", method: "POST", path: "/derp/probe"},
	{name: "generate-204", method: "GET", path: "/generate_204",
		header:  map[string]string{"X-Tailscale-Challenge": "ts_challenge-1.2:3"},
		compare: []string{"X-Tailscale-Response", "Cache-Control"}},
	{name: "generate-204-bad-challenge", method: "GET", path: "/generate_204",
		header:  map[string]string{"X-Tailscale-Challenge": "no spaces/allowed"},
		compare: []string{"X-Tailscale-Response"}},
	{name: "generate-204-long-challenge", method: "GET", path: "/generate_204",
		header:  map[string]string{"X-Tailscale-Challenge": strings.Repeat("a", 65)},
		compare: []string{"X-Tailscale-Response"}},
	{name: "derp-without-upgrade", method: "GET", path: "/derp"},
	{name: "derp-weird-upgrade", method: "GET", path: "/derp", header: map[string]string{"Upgrade": "h2c", "Connection": "Upgrade"}},
	{name: "robots", method: "GET", path: "/robots.txt", body: true},
	{name: "upgrade-derp", method: "GET", path: "/derp",
		header:  map[string]string{"Upgrade": "DERP", "Connection": "Upgrade"},
		compare: []string{"Upgrade", "Derp-Version"}},
}

// TestHTTPEndpointsLikeDerper sends the same plain requests to our relay and
// to derper and compares status codes and the headers clients read.
func TestHTTPEndpointsLikeDerper(t *testing.T) {
	relay := startRelay(t, "ours", relayOptions{Cert: newTestCert(t)})
	derper := startDerper(t, "derper", derperOptions{})
	relayKey, _ := relay.PublicKey()

	for _, tc := range endpointCases {
		t.Run(tc.name, func(t *testing.T) {
			ours := doEndpoint(t, relay.DERPAddr(), relay.Status.CertName, tc)
			ref := doEndpoint(t, derper.addr(), derper.cert.CertName, tc)
			if ours.StatusCode != ref.StatusCode {
				t.Errorf("%s %s: status %d, derper %d", tc.method, tc.path, ours.StatusCode, ref.StatusCode)
			}
			for _, h := range tc.compare {
				if got, want := ours.Header.Get(h), ref.Header.Get(h); got != want {
					t.Errorf("%s %s: header %s = %q, derper %q", tc.method, tc.path, h, got, want)
				}
			}
			if tc.body && ours.body != ref.body {
				t.Errorf("%s %s: body %q, derper %q", tc.method, tc.path, ours.body, ref.body)
			}
			if tc.name == "upgrade-derp" {
				if got, want := ours.Header.Get("Derp-Public-Key"), relayKey.UntypedHexString(); got != want {
					t.Errorf("Derp-Public-Key = %q, want the relay key %q", got, want)
				}
			}
		})
	}
}

type endpointResult struct {
	*http.Response
	body string
}

func doEndpoint(t *testing.T, addr, certName string, tc endpointCase) endpointResult {
	t.Helper()
	cfg, err := pinnedTLSConfig(certName)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, tc.method, fmt.Sprintf("https://%s%s", addr, tc.path), nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range tc.header {
		req.Header.Set(k, v)
	}
	res, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("%s %s to %s: %v", tc.method, tc.path, addr, err)
	}
	defer res.Body.Close()
	var body []byte
	if res.StatusCode != http.StatusSwitchingProtocols {
		body, _ = io.ReadAll(io.LimitReader(res.Body, 64<<10))
	}
	return endpointResult{res, string(body)}
}
