package interop

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// toolTimeout bounds one run of a Tailscale command-line tool.
const toolTimeout = 3 * time.Minute

// runTool runs one of Tailscale's binaries and returns its combined output.
func runTool(t *testing.T, env []string, path string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	t.Logf("$ %s %s\n%s", path, strings.Join(args, " "), out)
	return string(out), err
}

// TestStunc: Tailscale's stunc, pointed at our relay's STUN port, gets an
// answer naming the address it sent from, and the relay counts it.
func TestStunc(t *testing.T) {
	relay := startRelay(t, "relay", relayOptions{})
	success := `stun_requests_total{disposition="success"}`
	before := relay.metric(t, success)
	out, err := runTool(t, nil, stuncPath, "-timeout", "5s", "127.0.0.1", strconv.Itoa(relay.Status.STUNPort))
	if err != nil {
		t.Fatalf("stunc: %v", err)
	}
	if !regexp.MustCompile(`(?m)^stun addr: 127\.0\.0\.1:\d+$`).MatchString(out) {
		t.Errorf("stunc reported no mapped 127.0.0.1 address")
	}
	if after := relay.metric(t, success); after != before+1 {
		t.Errorf("%s went %v -> %v, want one more", success, before, after)
	}
}

// TestDerpprobe: Tailscale's derpprobe -once, given a DERP map of a meshed
// two-relay region, passes every probe it runs: TLS, STUN, and the mesh
// between each pair of nodes.
func TestDerpprobe(t *testing.T) {
	relays, meshKeyFile := startRelayRegion(t, 2)
	mapFile := writeProberMap(t, relays)
	const interval = "20s" // also each probe's timeout
	out, err := runTool(t,
		// The TLS probe verifies certificates with the system roots: trust the test certificates.
		[]string{"SSL_CERT_FILE=" + relays[0].opts.MeshCAFile},
		derpprobePath, "-once", "-spread=false", "-derp-map", "file://"+mapFile, "-mesh-psk-file", meshKeyFile,
		"-interval", interval, "-mesh-interval", interval, "-stun-interval", interval, "-tls-interval", interval,
	)
	if err != nil {
		t.Fatalf("derpprobe -once: %v", err)
	}
	good := regexp.MustCompile(`(?m)good: (derp/interop/[^\s:]+):`).FindAllStringSubmatch(out, -1)
	seen := map[string]bool{}
	for _, m := range good {
		seen[m[1]] = true
	}
	for _, from := range []string{"900a", "900b"} {
		for _, probe := range []string{"/tls", "/udp", "/900a/mesh", "/900b/mesh"} {
			if name := "derp/interop/" + from + probe; !seen[name] {
				t.Errorf("derpprobe did not report %s as good", name)
			}
		}
	}
}
