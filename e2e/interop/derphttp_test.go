package interop

import (
	"bytes"
	crand "crypto/rand"
	"crypto/tls"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derpconst"
	"tailscale.com/derp/derphttp"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

// packetSizes are the payloads every transport must carry unchanged: the
// smallest, a typical WireGuard packet, and DERP's maximum.
var packetSizes = []int{1, 1200, derp.MaxPacketSize}

// TestDERPHTTPUpgrade: two derphttp clients over TLS with `Upgrade: DERP`.
func TestDERPHTTPUpgrade(t *testing.T) {
	relay := startRelay(t, "r1", relayOptions{})
	exerciseClientPair(t, relay)
	if got := relay.metric(t, "derp_websocket_accepts_total"); got != 0 {
		t.Errorf("derp_websocket_accepts_total = %v on the Upgrade: DERP path, want 0", got)
	}
}

// TestDERPHTTPWebSocket: the same exchange over WebSocket (subprotocol "derp").
func TestDERPHTTPWebSocket(t *testing.T) {
	if !builtWithWebsockets {
		t.Fatal("derphttp was built without its WebSocket client: run with -tags ts_debug_websockets (e2e/interop/run does)")
	}
	relay := startRelay(t, "r1", relayOptions{})
	// derphttp dials WebSockets with http.DefaultClient; trust the relay the
	// way the DERP map says (the CertName pin) for the length of this test.
	tr := http.DefaultTransport.(*http.Transport)
	prevTLS := tr.TLSClientConfig
	cfg, err := pinnedTLSConfig(relay.Status.CertName)
	if err != nil {
		t.Fatal(err)
	}
	tr.TLSClientConfig = cfg
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		tr.TLSClientConfig = prevTLS
	})
	t.Setenv("TS_DEBUG_DERP_WS_CLIENT", "true") // read by derphttp at each connect

	exerciseClientPair(t, relay)
	if got := relay.metric(t, "derp_websocket_accepts_total"); got < 2 {
		t.Errorf("derp_websocket_accepts_total = %v, want >= 2 (did the clients use WebSocket?)", got)
	}
}

// exerciseClientPair connects two clients to relay and checks packets of
// every size both ways, ping, NotePreferred and PeerGone.
func exerciseClientPair(t *testing.T, relay *relayProc) {
	ctx := testContext(t, 60*time.Second)
	node := relay.Node("900a")
	serverKey, _ := relay.PublicKey()

	a := regionClient(t, "a", node)
	b := regionClient(t, "b", node)
	for _, c := range []*derphttp.Client{a, b} {
		if err := c.Connect(ctx); err != nil {
			t.Fatalf("Connect: %v", err)
		}
		if got := c.ServerPublicKey(); got != serverKey {
			t.Fatalf("server key from handshake %v, status file says %v", got, serverKey)
		}
	}
	if !builtWithWebsockets || os.Getenv("TS_DEBUG_DERP_WS_CLIENT") == "" {
		checkMetaCert(t, a, serverKey)
	}
	ra := startReceiver(t, "a", a)
	rb := startReceiver(t, "b", b)
	// derper sends ServerInfo right after accepting ClientInfo.
	ra.next(ctx, "ServerInfo", isServerInfo)
	rb.next(ctx, "ServerInfo", isServerInfo)

	t.Run("packets", func(t *testing.T) {
		for _, size := range packetSizes {
			sendAndExpect(t, a, b, rb, size)
			sendAndExpect(t, b, a, ra, size)
		}
	})

	t.Run("ping", func(t *testing.T) {
		for _, c := range []*derphttp.Client{a, b} {
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("Ping: %v", err)
			}
		}
	})

	t.Run("not-preferred-then-preferred", func(t *testing.T) {
		const metric = "derp_current_home_connections"
		wait := func(want float64) {
			t.Helper()
			var got float64
			err := waitFor(ctx, metric, func() bool {
				got = relay.metric(t, metric)
				return got == want
			})
			if err != nil {
				t.Fatalf("%s = %v, want %v: %v", metric, got, want, err)
			}
		}
		wait(0)
		a.NotePreferred(true)
		wait(1)
		b.NotePreferred(true)
		wait(2)
		a.NotePreferred(false)
		wait(1)
		b.NotePreferred(false)
		wait(0)
	})

	t.Run("peer-gone-not-here", func(t *testing.T) {
		// derper answers only disco packets for unknown peers (and at most
		// 3 a second): a plain packet is dropped silently.
		stranger := key.NewNode().Public()
		if err := a.Send(stranger, []byte("not disco")); err != nil {
			t.Fatal(err)
		}
		if err := a.Send(stranger, discoLikePacket()); err != nil {
			t.Fatal(err)
		}
		m := ra.next(ctx, "PeerGone(not here)", func(m derp.ReceivedMessage) bool {
			_, ok := m.(derp.PeerGoneMessage)
			return ok
		}).(derp.PeerGoneMessage)
		if m.Peer != stranger || m.Reason != derp.PeerGoneReasonNotHere {
			t.Fatalf("got %+v, want PeerGone(%v, not here)", m, stranger)
		}
		// The plain packet came first; had it been answered, that answer
		// would have been the one above. Nothing else must follow.
		quiet := testContext(t, 500*time.Millisecond)
		if m, err := ra.nextErr(quiet, func(m derp.ReceivedMessage) bool {
			_, ok := m.(derp.PeerGoneMessage)
			return ok
		}); err == nil {
			t.Fatalf("second PeerGone %+v for one disco packet", m)
		}
	})

	t.Run("peer-gone-disconnected", func(t *testing.T) {
		// a has received from b above, so the relay tells a when b leaves.
		bKey := b.SelfPublicKey()
		b.Close()
		ra.next(ctx, "PeerGone(disconnected)", peerGone(bKey, derp.PeerGoneReasonDisconnected))
	})

	t.Run("oversized-packet-closes-connection", func(t *testing.T) {
		// derper reads at most MaxPacketSize bytes of packet and drops the
		// connection of a client that sends more.
		c := regionClient(t, "oversize", node)
		rc := startReceiver(t, "oversize", c)
		rc.next(ctx, "ServerInfo", isServerInfo)
		if err := c.Send(a.SelfPublicKey(), make([]byte, derp.MaxPacketSize+1)); err != nil {
			t.Fatalf("Send: %v", err)
		}
		if err := waitFor(ctx, "the relay to close the connection", func() bool { return len(rc.recvErrors()) > 0 }); err != nil {
			t.Fatal(err)
		}
	})
}

// discoLikePacket is what derper's disco check accepts: the disco magic, a
// 32-byte sender key and a 24-byte nonce (then a sealed box, here junk).
func discoLikePacket() []byte {
	p := append([]byte(disco.Magic), make([]byte, 32+24+16)...)
	crand.Read(p[len(disco.Magic):])
	return p
}

// checkMetaCert checks that the TLS chain carries derper's "meta
// certificate" (CN derpkey<hex>, serial = protocol version), which lets
// derphttp skip waiting for the 101 response (Derp-Fast-Start).
func checkMetaCert(t *testing.T, c *derphttp.Client, serverKey key.NodePublic) {
	t.Helper()
	cs, ok := c.TLSConnectionState()
	if !ok {
		t.Fatal("no TLS connection state")
	}
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %#x, want TLS 1.3 (derphttp only looks for the meta certificate on 1.3)", cs.Version)
	}
	for _, cert := range cs.PeerCertificates {
		if hexKey, ok := strings.CutPrefix(cert.Subject.CommonName, derpconst.MetaCertCommonNamePrefix); ok {
			if hexKey != serverKey.UntypedHexString() {
				t.Errorf("meta certificate names key %s, want %s", hexKey, serverKey.UntypedHexString())
			}
			if v := cert.SerialNumber.Int64(); v != derp.ProtocolVersion {
				t.Errorf("meta certificate serial (protocol version) %d, want %d", v, derp.ProtocolVersion)
			}
			return
		}
	}
	t.Errorf("no meta certificate in the TLS chain: derphttp cannot fast-start")
}

// sendAndExpect sends a random packet of size from src to dst and waits for
// dst's receiver to get it unchanged.
func sendAndExpect(t *testing.T, src, dst *derphttp.Client, rdst *receiver, size int) {
	t.Helper()
	ctx := testContext(t, 15*time.Second)
	payload := make([]byte, size)
	crand.Read(payload)
	if err := src.Send(dst.SelfPublicKey(), payload); err != nil {
		t.Fatalf("Send(%d bytes): %v", size, err)
	}
	m := rdst.next(ctx, "packet", packetFrom(src.SelfPublicKey())).(derp.ReceivedPacket)
	if !bytes.Equal(m.Data, payload) {
		t.Fatalf("%d-byte packet arrived as %d bytes, or with other content", size, len(m.Data))
	}
}

// TestRelayRestart: on SIGTERM the relay tells clients it is restarting, exits
// 0, and the same clients reconnect to the new process and relay again.
func TestRelayRestart(t *testing.T) {
	relay := startRelay(t, "r1", relayOptions{})
	ctx := testContext(t, 90*time.Second)
	node := relay.Node("900a")
	a := regionClient(t, "a", node)
	b := regionClient(t, "b", node)
	ra := startReceiver(t, "a", a)
	rb := startReceiver(t, "b", b)
	ra.next(ctx, "ServerInfo", isServerInfo)
	rb.next(ctx, "ServerInfo", isServerInfo)
	sendAndExpect(t, a, b, rb, 1200)

	if err := relay.Stop(); err != nil {
		t.Fatalf("relay exit after SIGTERM: %v, want status 0", err)
	}
	for _, r := range []*receiver{ra, rb} {
		m := r.next(ctx, "ServerRestarting", func(m derp.ReceivedMessage) bool {
			_, ok := m.(derp.ServerRestartingMessage)
			return ok
		}).(derp.ServerRestartingMessage)
		if m.ReconnectIn <= 0 || m.TryFor <= 0 {
			t.Errorf("%s: Restarting frame %+v, want positive reconnect-in and try-for", r.name, m)
		}
	}

	// Same port, key and certificate: the DERP map stays valid.
	relay.opts.Addr = relay.DERPAddr()
	relay.opts.STUNPort = relay.Status.STUNPort
	relay.start()

	// Each Recv loop reconnects by itself; a new connection starts with ServerInfo.
	ra.next(ctx, "ServerInfo after reconnect", isServerInfo)
	rb.next(ctx, "ServerInfo after reconnect", isServerInfo)
	sendAndExpect(t, a, b, rb, 1200)
	sendAndExpect(t, b, a, ra, derp.MaxPacketSize)
}
