package interop

import (
	"fmt"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
)

// workerClients is enough derphttp clients that both of two workers take
// some (all on one worker: a 1 in 2048 chance).
const workerClients = 12

// TestWorkersAreOneRelay: derp-relay --workers 2, meshed with Tailscale's
// derper. Tailscale clients on our relay reach each other whichever worker
// the kernel gave each one, derper's mesh link (which lands on one worker)
// learns every worker's clients, and packets cross the mesh both ways.
func TestWorkersAreOneRelay(t *testing.T) {
	relay, derper, meshKey := startMixedMesh(t, 2)
	ctx := testContext(t, 120*time.Second)
	relayKey, _ := relay.PublicKey()
	// derper's watcher sees our relay's mesh links: one per worker, one key.
	wDerper := startWatcher(t, "watch-derper", derper.Node("900b"), meshKey)
	wDerper.waitPresent(t, ctx, relayKey, derp.PeerPresentIsMeshPeer)

	ours := make([]*derphttp.Client, workerClients)
	receivers := make([]*receiver, workerClients)
	for i := range ours {
		name := fmt.Sprintf("client-%d", i)
		ours[i] = regionClient(t, name, relay.Node("900a"))
		receivers[i] = startReceiver(t, name, ours[i])
		receivers[i].next(ctx, "ServerInfo", isServerInfo)
	}
	perWorker := [2]float64{
		relay.metric(t, `derp_worker_connections{worker="0"}`),
		relay.metric(t, `derp_worker_connections{worker="1"}`),
	}
	if perWorker[0] == 0 || perWorker[1] == 0 || perWorker[0]+perWorker[1] < workerClients {
		t.Fatalf("connections per worker %v: want both workers serving the %d clients", perWorker, workerClients)
	}
	for i, src := range ours {
		for j, dst := range ours {
			if i != j {
				sendAndExpect(t, src, dst, receivers[j], 1200)
			}
		}
	}
	if got := relay.metric(t, "derp_packets_to_workers_total"); got == 0 {
		t.Errorf("derp_packets_to_workers_total = 0: no packet crossed between workers")
	}

	// derper's mesh link to us sits on one worker and must see every worker's clients.
	onDerper := regionClient(t, "client-derper", derper.Node("900b"))
	rD := startReceiver(t, "client-derper", onDerper)
	rD.next(ctx, "ServerInfo", isServerInfo)
	sendUntilDelivered(t, ctx, onDerper, ours[0], receivers[0])
	for i, c := range ours {
		sendUntilDelivered(t, ctx, onDerper, c, receivers[i])
		sendAndExpect(t, onDerper, c, receivers[i], 1200)
		sendUntilDelivered(t, ctx, c, onDerper, rD)
		sendAndExpect(t, c, onDerper, rD, 1200)
	}

	// A client leaving any worker: derper's client, which heard from it, is told.
	last := ours[workerClients-1]
	lastKey := last.SelfPublicKey()
	last.Close()
	rD.next(ctx, "PeerGone of our client via the mesh", peerGone(lastKey, derp.PeerGoneReasonDisconnected))
	if err := relay.Stop(); err != nil {
		t.Errorf("relay with 2 workers did not exit cleanly on SIGTERM: %v", err)
	}
}
