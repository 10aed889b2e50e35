package interop

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/net/netns"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration/testcontrol"
)

// tailnetPayload is how much one node sends the other through the relay.
const tailnetPayload = 10 << 20

// quietKnobs keep tsnet on loopback: no port mapping (which would talk to
// the LAN gateway), no direct UDP paths (only DERP), no LAN addresses
// advertised, no log upload.
var quietKnobs = map[string]string{
	"TS_DISABLE_PORTMAPPER":     "true",
	"TS_DISABLE_UPNP":           "true",
	"TS_DEBUG_NEVER_DIRECT_UDP": "true",
	"TS_DEBUG_OMIT_LOCAL_ADDRS": "true",
	"TS_NO_LOGS_NO_SUPPORT":     "true",
}

// TestTailnetThroughRelay: two tsnet nodes under Tailscale's test control
// server, whose DERP map holds only our relay and whose direct paths are
// disabled, open a TCP connection and move 10 MB through our relay.
func TestTailnetThroughRelay(t *testing.T) {
	for k, v := range quietKnobs {
		prev, had := os.LookupEnv(k)
		envknob.Setenv(k, v) // also updates knobs registered at init
		t.Cleanup(func() {
			if had {
				envknob.Setenv(k, prev)
			} else {
				envknob.Setenv(k, "")
			}
		})
	}
	netns.SetEnabled(false) // as tailscale's own tsnet tests: no SO_MARK sockets
	t.Cleanup(func() { netns.SetEnabled(true) })

	relay := startRelay(t, "r1", relayOptions{})
	ctx := testContext(t, 4*time.Minute)

	logs := new(lockedBuffer)
	logf := func(format string, args ...any) { fmt.Fprintf(logs, format+"\n", args...) }
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- control and node logs ----\n%s---- end ----", logs.String())
		}
	})
	control := &testcontrol.Server{
		DERPMap:   derpMapOf(relay.Node("900a")),
		DNSConfig: &tailcfg.DNSConfig{Proxied: true},
		Logf:      logf,
	}
	control.HTTPTestServer = httptest.NewUnstartedServer(control)
	control.HTTPTestServer.Start()
	t.Cleanup(control.HTTPTestServer.Close)

	s1 := startTSNet(t, ctx, control.HTTPTestServer.URL, "node1", logf)
	s2 := startTSNet(t, ctx, control.HTTPTestServer.URL, "node2", logf)
	ip1, _ := s1.TailscaleIPs()

	ln, err := s1.Listen("tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		n   int64
		sum []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err == nil {
			_, err = c.Write(h.Sum(nil)) // acknowledge with the digest
		}
		got <- result{n, h.Sum(nil), err}
	}()

	before := relay.metric(t, "derp_bytes_received_total")
	payload := make([]byte, tailnetPayload)
	crand.Read(payload)
	want := sha256.Sum256(payload)

	start := time.Now()
	conn, err := s2.Dial(ctx, "tcp", net.JoinHostPort(ip1.String(), "8080"))
	if err != nil {
		t.Fatalf("node2 dialing node1 over the tailnet: %v", err)
	}
	defer conn.Close()
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	if _, err := conn.Write(payload); err != nil {
		t.Fatalf("writing %d bytes: %v", len(payload), err)
	}
	conn.(interface{ CloseWrite() error }).CloseWrite()
	ack := make([]byte, sha256.Size)
	if _, err := io.ReadFull(conn, ack); err != nil {
		t.Fatalf("reading node1's acknowledgement: %v", err)
	}
	r := <-got
	if r.err != nil {
		t.Fatalf("node1: %v", r.err)
	}
	if r.n != tailnetPayload || !bytes.Equal(r.sum, want[:]) || !bytes.Equal(ack, want[:]) {
		t.Fatalf("node1 received %d bytes with sha256 %x, want %d bytes with %x", r.n, r.sum, tailnetPayload, want)
	}
	t.Logf("moved %d MB over the tailnet in %v", tailnetPayload>>20, time.Since(start).Round(time.Millisecond))

	// The bytes went through our relay, not a direct path.
	relayed := relay.metric(t, "derp_bytes_received_total") - before
	if relayed < tailnetPayload {
		t.Errorf("relay received %.0f packet bytes during the transfer, want at least %d", relayed, tailnetPayload)
	}
	lc, err := s2.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	st, err := lc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var sawPeer bool
	for _, p := range st.Peer {
		for _, ip := range p.TailscaleIPs {
			if ip == ip1 {
				sawPeer = true
				if p.CurAddr != "" {
					t.Errorf("node2 reaches node1 directly at %s; want DERP only", p.CurAddr)
				}
				if p.Relay != "interop" {
					t.Errorf("node2's DERP region for node1 is %q, want %q", p.Relay, "interop")
				}
			}
		}
	}
	if !sawPeer {
		t.Errorf("node2's status has no peer with %v", ip1)
	}
}

// startTSNet brings up an ephemeral tsnet node and waits until it is
// connected to its home DERP (our relay).
func startTSNet(t *testing.T, ctx context.Context, controlURL, hostname string, logf func(string, ...any)) *tsnet.Server {
	t.Helper()
	dir := filepath.Join(t.TempDir(), hostname)
	s := &tsnet.Server{
		Dir:        dir,
		ControlURL: controlURL,
		Hostname:   hostname,
		Store:      new(mem.Store),
		Ephemeral:  true,
		Logf:       func(format string, args ...any) { logf(hostname+": "+format, args...) },
		UserLogf:   func(format string, args ...any) { logf(hostname+": "+format, args...) },
	}
	t.Cleanup(func() { s.Close() })
	if _, err := s.Up(ctx); err != nil {
		t.Fatalf("%s Up: %v", hostname, err)
	}
	h := s.Sys().HealthTracker.Get()
	ms := s.Sys().MagicSock.Get()
	err := waitFor(ctx, hostname+" home DERP connection", func() bool {
		r := ms.GetLastNetcheckReport(ctx)
		return r != nil && r.PreferredDERP == testRegionID && !h.GetDERPRegionReceivedTime(testRegionID).IsZero()
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}
