package interop

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"tailscale.com/prober"
	"tailscale.com/tailcfg"
)

// startRelayRegion starts n of our relays meshed into one region (each lists
// every member, itself included, in --mesh-with) and returns them in order.
func startRelayRegion(t *testing.T, n int) ([]*relayProc, string) {
	t.Helper()
	meshKeyFile, _ := writeMeshKey(t)
	certs := make([]*testCert, n)
	addrs := make([]string, n)
	for i := range n {
		certs[i] = newTestCert(t)
		addrs[i] = net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t, "tcp")))
	}
	ca := writeCABundle(t, certs...)
	relays := make([]*relayProc, n)
	for i := range n {
		relays[i] = startRelay(t, "r"+strconv.Itoa(i+1), relayOptions{
			Addr: addrs[i], Cert: certs[i], MeshKeyFile: meshKeyFile, MeshWith: addrs, MeshCAFile: ca,
		})
	}
	// Wait until every member's mesh links are up.
	ctx := testContext(t, meshConvergeTimeout)
	for _, r := range relays {
		err := waitFor(ctx, r.name+" mesh links", func() bool {
			return r.metric(t, "derp_mesh_peers_connected") >= float64(n-1)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return relays, meshKeyFile
}

// writeProberMap writes a DERP map of the relays (900a, 900b, …) for the
// prober and returns its path. The prober insists that the TLS server name
// equals the node's HostName, and Go records no server name for an IP
// address: the nodes are named "localhost" (dialed at their IPv4, trusted by
// the CertName pin).
func writeProberMap(t *testing.T, relays []*relayProc) string {
	t.Helper()
	nodes := make([]*tailcfg.DERPNode, len(relays))
	for i, r := range relays {
		nodes[i] = r.Node("900" + string(rune('a'+i)))
		nodes[i].HostName = "localhost"
	}
	js, err := json.Marshal(derpMapOf(nodes...))
	if err != nil {
		t.Fatal(err)
	}
	mapFile := filepath.Join(t.TempDir(), "derpmap.json")
	if err := os.WriteFile(mapFile, js, 0o644); err != nil {
		t.Fatal(err)
	}
	return mapFile
}

// TestProber: Tailscale's DERP prober, given a DERP map file holding a
// two-node region of our relays, passes its mesh, bandwidth and STUN probes.
func TestProber(t *testing.T) {
	relays, _ := startRelayRegion(t, 2)
	mapFile := writeProberMap(t, relays)

	// The interval also bounds each probe (probes time out just before it).
	const interval = 20 * time.Second
	p := prober.New().WithSpread(false).WithOnce(true).WithMetricNamespace("interop")
	dp, err := prober.DERP(p, "file://"+mapFile,
		prober.WithMeshProbing(interval),
		prober.WithSTUNProbing(interval),
		prober.WithBandwidthProbing(interval, 1_000_000, ""),
	)
	if err != nil {
		t.Fatal(err)
	}
	p.Run("derpmap-probe", interval, nil, dp.ProbeMap)
	done := make(chan struct{})
	go func() { p.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * interval):
		t.Fatal("prober did not finish")
	}

	want := map[string]bool{}
	for _, from := range []string{"900a", "900b"} {
		want["derp/interop/"+from+"/udp"] = true
		for _, to := range []string{"900a", "900b"} {
			want["derp/interop/"+from+"/"+to+"/mesh"] = true
			want["derp/interop/"+from+"/"+to+"/bw"] = true
		}
	}
	for name, info := range p.ProbeInfo() {
		t.Logf("probe %s: %s in %v %s", name, info.Status, info.Latency, info.Error)
		if info.Status != prober.ProbeStatusSucceeded {
			t.Errorf("probe %s failed: %s", name, info.Error)
		}
		delete(want, name)
	}
	for name := range want {
		t.Errorf("probe %s never ran", name)
	}
	for _, r := range relays {
		if got := r.metric(t, "derp_packets_forwarded_out_total") + r.metric(t, "derp_packets_forwarded_in_total"); got == 0 {
			t.Errorf("relay %s forwarded nothing over the mesh during the cross-node probes", r.name)
		}
	}
}
