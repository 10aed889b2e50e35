package interop

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// testRegionID is in the 900-999 range kept for self-hosted relays.
const testRegionID = 900

// derpMapOf builds a DERP map holding one region with the given nodes and no
// default regions.
func derpMapOf(nodes ...*tailcfg.DERPNode) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{
		OmitDefaultRegions: true,
		Regions: map[int]*tailcfg.DERPRegion{
			testRegionID: {
				RegionID:   testRegionID,
				RegionCode: "interop",
				RegionName: "derpfleet interop",
				Nodes:      nodes,
			},
		},
	}
}

// pinnedTLSConfig trusts exactly the certificate named by a DERP map
// CertName of the form "sha256-raw:<hex>", as tailscale's tlsdial does.
func pinnedTLSConfig(certName string) (*tls.Config, error) {
	want, ok := strings.CutPrefix(certName, "sha256-raw:")
	if !ok {
		return nil, fmt.Errorf("certName %q is not a sha256-raw pin", certName)
	}
	return &tls.Config{
		InsecureSkipVerify: true, // replaced by the pin check below
		NextProtos:         []string{"http/1.1"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no peer certificate")
			}
			sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if got := hex.EncodeToString(sum[:]); got != want {
				return fmt.Errorf("certificate sha256 %s, want pin %s", got, want)
			}
			return nil
		},
	}, nil
}

// regionClient is a derphttp client for node n, the way magicsock makes them.
func regionClient(t testing.TB, name string, n *tailcfg.DERPNode) *derphttp.Client {
	t.Helper()
	return regionClientWithKey(t, name, key.NewNode(), n)
}

func regionClientWithKey(t testing.TB, name string, priv key.NodePrivate, n *tailcfg.DERPNode) *derphttp.Client {
	t.Helper()
	dm := derpMapOf(n)
	c := derphttp.NewRegionClient(priv, prefixLogf(t, name), netmon.NewStatic(), func() *tailcfg.DERPRegion {
		return dm.Regions[testRegionID]
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// prefixLogf sends a client's logs to the test log with a name.
func prefixLogf(t testing.TB, name string) func(string, ...any) {
	return func(format string, args ...any) {
		t.Logf(name+": "+format, args...)
	}
}

// scrapeMetrics fetches the relay's /metrics over its pinned TLS.
func (r *relayProc) scrapeMetrics(ctx context.Context) (map[string]float64, error) {
	body, err := r.get(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	return parsePromText(strings.NewReader(body))
}

// get fetches one of the relay's plain HTTP pages over its pinned TLS.
func (r *relayProc) get(ctx context.Context, path string) (string, error) {
	var cfg *tls.Config
	scheme := "http"
	if r.Status.TLS {
		var err error
		if cfg, err = pinnedTLSConfig(r.Status.CertName); err != nil {
			return "", err
		}
		scheme = "https"
	}
	return getText(ctx, scheme+"://"+r.DERPAddr()+path, cfg)
}

// getText GETs url and returns the body of a 200 answer.
func getText(ctx context.Context, url string, cfg *tls.Config) (string, error) {
	tr := &http.Transport{TLSClientConfig: cfg}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return "", err
	}
	res, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 4<<20))
	if err != nil {
		return "", err
	}
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s: %.4000s", url, res.Status, b)
	}
	return string(b), nil
}

// parsePromText reads the Prometheus text format into "name{labels}" -> value.
func parsePromText(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("bad metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("bad metrics value in %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// metric returns one value of the relay's metrics, failing the test if absent.
func (r *relayProc) metric(t testing.TB, name string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := r.scrapeMetrics(ctx)
	if err != nil {
		t.Fatalf("relay %s metrics: %v", r.name, err)
	}
	v, ok := m[name]
	if !ok {
		t.Fatalf("relay %s has no metric %q", r.name, name)
	}
	return v
}

// waitFor polls cond every 50ms until it holds or ctx ends.
func waitFor(ctx context.Context, what string, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out waiting for %s: %w", what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}
