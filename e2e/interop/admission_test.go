package interop

import (
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// admissionServer answers --verify-client-url requests the way derper's
// admission controllers do (tailcfg.DERPAdmitClientRequest/Response).
type admissionServer struct {
	*httptest.Server
	mu      sync.Mutex
	allowed map[key.NodePublic]bool
	seen    []tailcfg.DERPAdmitClientRequest
}

func startAdmissionServer(t *testing.T) *admissionServer {
	a := &admissionServer{allowed: map[key.NodePublic]bool{}}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != "POST" {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		var req tailcfg.DERPAdmitClientRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			t.Errorf("admission request is not a DERPAdmitClientRequest: %v", err)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		a.mu.Lock()
		a.seen = append(a.seen, req)
		allow := a.allowed[req.NodePublic]
		a.mu.Unlock()
		json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
	}))
	t.Cleanup(a.Close)
	return a
}

func (a *admissionServer) allow(k key.NodePublic) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.allowed[k] = true
}

func (a *admissionServer) requestsFor(k key.NodePublic) []tailcfg.DERPAdmitClientRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []tailcfg.DERPAdmitClientRequest
	for _, r := range a.seen {
		if r.NodePublic == k {
			out = append(out, r)
		}
	}
	return out
}

// TestAdmission: with --verify-client-url, allowed node keys relay and a
// denied one is refused (derper closes it before ServerInfo).
func TestAdmission(t *testing.T) {
	adm := startAdmissionServer(t)
	relay := startRelay(t, "r1", relayOptions{VerifyClientURL: adm.URL, FailOpen: false})
	ctx := testContext(t, 60*time.Second)
	node := relay.Node("900a")

	privA, privB, privD := key.NewNode(), key.NewNode(), key.NewNode()
	adm.allow(privA.Public())
	adm.allow(privB.Public())

	a := regionClientWithKey(t, "allowed-a", privA, node)
	b := regionClientWithKey(t, "allowed-b", privB, node)
	ra := startReceiver(t, "allowed-a", a)
	rb := startReceiver(t, "allowed-b", b)
	ra.next(ctx, "ServerInfo", isServerInfo)
	rb.next(ctx, "ServerInfo", isServerInfo)
	sendAndExpect(t, a, b, rb, 1200)
	sendAndExpect(t, b, a, ra, 1200)

	d := regionClientWithKey(t, "denied", privD, node)
	rd := startReceiver(t, "denied", d)
	// The denied client must never get ServerInfo, and its connection must be
	// closed: Recv fails (and keeps failing on each reconnect).
	denyCtx := testContext(t, 5*time.Second)
	if m, err := rd.nextErr(denyCtx, isServerInfo); err == nil {
		t.Fatalf("denied client got %T; the relay admitted it", m)
	}
	if len(rd.recvErrors()) == 0 {
		t.Fatalf("denied client's connection stayed open")
	}
	reqs := adm.requestsFor(privD.Public())
	if len(reqs) == 0 {
		t.Fatalf("relay never asked the admission server about the denied key")
	}
	if src := reqs[0].Source; !src.IsLoopback() {
		t.Errorf("admission request Source = %v, want the client's loopback address", src)
	}
	// Nothing sent to the denied key is delivered: the relay does not know it.
	if err := a.Send(privD.Public(), discoLikePacket()); err != nil {
		t.Fatal(err)
	}
	ra.next(ctx, "PeerGone(not here) for the denied key", peerGone(privD.Public(), derp.PeerGoneReasonNotHere))
}

// TestAdmissionUnreachable: an unreachable admission server refuses clients
// when fail-open is false, and admits them when it is true.
func TestAdmissionUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadURL := "http://" + ln.Addr().String() + "/verify"
	ln.Close()

	for _, failOpen := range []bool{false, true} {
		name := "fail-closed"
		if failOpen {
			name = "fail-open"
		}
		t.Run(name, func(t *testing.T) {
			relay := startRelay(t, "r1", relayOptions{VerifyClientURL: deadURL, FailOpen: failOpen})
			c := regionClient(t, "client", relay.Node("900a"))
			rc := startReceiver(t, "client", c)
			ctx := testContext(t, 10*time.Second)
			_, err := rc.nextErr(ctx, isServerInfo)
			if failOpen && err != nil {
				t.Fatalf("fail-open relay did not admit the client: %v (Recv errors: %v)", err, rc.recvErrors())
			}
			if !failOpen && err == nil {
				t.Fatalf("fail-closed relay admitted a client although the admission server is down")
			}
		})
	}
}
