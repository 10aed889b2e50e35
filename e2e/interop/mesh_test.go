package interop

import (
	"context"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// meshConvergeTimeout bounds how long a fresh mesh may take to learn the
// clients of its other members.
const meshConvergeTimeout = 30 * time.Second

// TestMixedMesh: our relay and Tailscale's derper share one mesh key and list
// each other (and themselves, as fleets do) in --mesh-with. A client on each
// exchanges packets both ways, and each side's mesh watcher sees the other's
// clients: what reaches one member is forwarded to the other, and PeerGone
// crosses the mesh when a client leaves.
func TestMixedMesh(t *testing.T) {
	relay, derper, meshKey := startMixedMesh(t, 0)
	relayKey, _ := relay.PublicKey()
	ctx := testContext(t, 120*time.Second)

	// Watchers (mesh-key clients, as derper's mesh links are) on both members.
	wRelay := startWatcher(t, "watch-ours", relay.Node("900a"), meshKey)
	wDerper := startWatcher(t, "watch-derper", derper.Node("900b"), meshKey)

	// Each member's mesh link to the other shows up as a mesh-peer client.
	wRelay.waitPresent(t, ctx, derper.PublicKey, derp.PeerPresentIsMeshPeer)
	wDerper.waitPresent(t, ctx, relayKey, derp.PeerPresentIsMeshPeer)

	onRelay := regionClient(t, "client-ours", relay.Node("900a"))
	onDerper := regionClient(t, "client-derper", derper.Node("900b"))
	rR := startReceiver(t, "client-ours", onRelay)
	rD := startReceiver(t, "client-derper", onDerper)
	rR.next(ctx, "ServerInfo", isServerInfo)
	rD.next(ctx, "ServerInfo", isServerInfo)

	// Regular clients are announced the same way by both members.
	fR := wRelay.waitPresent(t, ctx, onRelay.SelfPublicKey(), derp.PeerPresentIsRegular)
	fD := wDerper.waitPresent(t, ctx, onDerper.SelfPublicKey(), derp.PeerPresentIsRegular)
	if fR != fD {
		t.Errorf("PeerPresent flags for a regular client: ours %#x, derper %#x", fR, fD)
	}

	// The first packet may race the mesh learning about the new client.
	sendUntilDelivered(t, ctx, onRelay, onDerper, rD)
	sendUntilDelivered(t, ctx, onDerper, onRelay, rR)
	for _, size := range packetSizes {
		sendAndExpect(t, onRelay, onDerper, rD, size)
		sendAndExpect(t, onDerper, onRelay, rR, size)
	}
	if got := relay.metric(t, "derp_packets_forwarded_out_total"); got < float64(1+len(packetSizes)) {
		t.Errorf("derp_packets_forwarded_out_total = %v: our relay did not forward to derper", got)
	}
	if got := relay.metric(t, "derp_packets_forwarded_in_total"); got < float64(1+len(packetSizes)) {
		t.Errorf("derp_packets_forwarded_in_total = %v: derper did not forward to our relay", got)
	}

	// A client leaving one member: the peer on the other member hears PeerGone.
	dKey := onDerper.SelfPublicKey()
	onDerper.Close()
	rR.next(ctx, "PeerGone of derper's client via the mesh", peerGone(dKey, derp.PeerGoneReasonDisconnected))
	wDerper.waitGone(t, ctx, dKey)

	again := regionClient(t, "client-derper-2", derper.Node("900b"))
	rA := startReceiver(t, "client-derper-2", again)
	rA.next(ctx, "ServerInfo", isServerInfo)
	sendUntilDelivered(t, ctx, again, onRelay, rR)
	sendAndExpect(t, onRelay, again, rA, 1200)
	rKey := onRelay.SelfPublicKey()
	onRelay.Close()
	rA.next(ctx, "PeerGone of our client via the mesh", peerGone(rKey, derp.PeerGoneReasonDisconnected))
	wRelay.waitGone(t, ctx, rKey)
}

// startMixedMesh starts our relay (with --workers workers; 0: its default)
// and derper, meshed with one key, each listing both (as fleets do).
func startMixedMesh(t *testing.T, workers int) (*relayProc, *derperProc, key.DERPMesh) {
	meshKeyFile, meshKey := writeMeshKey(t)
	relayCert, derperCert := newTestCert(t), newTestCert(t)
	ca := writeCABundle(t, relayCert, derperCert)
	relayAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t, "tcp")))
	derperPort := freePort(t, "tcp")
	derperAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(derperPort))
	members := []string{relayAddr, derperAddr}
	relay := startRelay(t, "ours", relayOptions{
		Addr: relayAddr, Cert: relayCert, MeshKeyFile: meshKeyFile, MeshWith: members, MeshCAFile: ca,
		Workers: workers,
	})
	derper := startDerper(t, "derper", derperOptions{
		Port: derperPort, Cert: derperCert, MeshKeyFile: meshKeyFile, MeshWith: members, CAFile: ca,
	})
	return relay, derper, meshKey
}

// sendUntilDelivered resends a small packet until dst receives one, for the
// moments right after a client appears on another mesh member.
func sendUntilDelivered(t *testing.T, ctx context.Context, src, dst *derphttp.Client, rdst *receiver) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, meshConvergeTimeout)
	defer cancel()
	for {
		if err := src.Send(dst.SelfPublicKey(), []byte("mesh hello")); err != nil {
			t.Fatalf("Send: %v", err)
		}
		tctx, tcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		_, err := rdst.nextErr(tctx, packetFrom(src.SelfPublicKey()))
		tcancel()
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s never received from %s through the mesh", rdst.name, src.SelfPublicKey().ShortString())
		}
	}
}

// watcher is a mesh-key client watching one relay's connections, as a mesh
// member's link does (derphttp.Client.RunWatchConnectionLoop).
type watcher struct {
	name    string
	mu      sync.Mutex
	present map[key.NodePublic]derp.PeerPresentFlags
	changed chan struct{}
}

func startWatcher(t *testing.T, name string, n *tailcfg.DERPNode, meshKey key.DERPMesh) *watcher {
	c := regionClient(t, name, n)
	c.MeshKey = meshKey
	w := &watcher{name: name, present: map[key.NodePublic]derp.PeerPresentFlags{}, changed: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		c.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("%s: watch loop did not stop", name)
		}
	})
	notify := func() {
		select {
		case w.changed <- struct{}{}:
		default:
		}
	}
	go func() {
		defer close(done)
		c.RunWatchConnectionLoop(ctx, key.NodePublic{}, prefixLogf(t, name),
			func(m derp.PeerPresentMessage) {
				w.mu.Lock()
				w.present[m.Key] = m.Flags
				w.mu.Unlock()
				notify()
			},
			func(m derp.PeerGoneMessage) {
				w.mu.Lock()
				delete(w.present, m.Peer)
				w.mu.Unlock()
				notify()
			},
			func(err error) { t.Logf("%s: %v", name, err) })
	}()
	return w
}

// waitPresent waits until k is present with flag set, and returns its flags.
func (w *watcher) waitPresent(t *testing.T, ctx context.Context, k key.NodePublic, flag derp.PeerPresentFlags) derp.PeerPresentFlags {
	t.Helper()
	var flags derp.PeerPresentFlags
	err := waitFor(ctx, w.name+" to see "+k.ShortString(), func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		f, ok := w.present[k]
		flags = f
		return ok && f&flag != 0
	})
	if err != nil {
		t.Fatalf("%v; present: %v", err, w.snapshot())
	}
	return flags
}

// snapshot copies the present set (never Fatal while holding w.mu: the
// watch loop's callbacks would block and the cleanup with them).
func (w *watcher) snapshot() map[key.NodePublic]derp.PeerPresentFlags {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[key.NodePublic]derp.PeerPresentFlags, len(w.present))
	for k, v := range w.present {
		out[k] = v
	}
	return out
}

func (w *watcher) waitGone(t *testing.T, ctx context.Context, k key.NodePublic) {
	t.Helper()
	err := waitFor(ctx, w.name+" to see "+k.ShortString()+" leave", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		_, ok := w.present[k]
		return !ok
	})
	if err != nil {
		t.Fatal(err)
	}
}
