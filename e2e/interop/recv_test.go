package interop

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// receiver runs a derphttp client's Recv loop (which also answers pings,
// matches pongs and reconnects) and queues what arrives for the test.
type receiver struct {
	t    testing.TB
	name string
	c    *derphttp.Client
	msgs chan derp.ReceivedMessage

	mu   sync.Mutex
	errs []error // Recv errors in order; each one is followed by a reconnect
}

// startReceiver starts c's Recv loop; it ends when c is closed.
func startReceiver(t testing.TB, name string, c *derphttp.Client) *receiver {
	r := &receiver{t: t, name: name, c: c, msgs: make(chan derp.ReceivedMessage, 1024)}
	done := make(chan struct{})
	t.Cleanup(func() {
		c.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("receiver %s: Recv loop did not stop", name)
		}
	})
	go func() {
		defer close(done)
		for {
			m, err := c.Recv()
			if errors.Is(err, derphttp.ErrClientClosed) {
				return
			}
			if err != nil {
				r.mu.Lock()
				r.errs = append(r.errs, err)
				r.mu.Unlock()
				time.Sleep(100 * time.Millisecond) // derphttp reconnects on the next Recv
				continue
			}
			select {
			case r.msgs <- m:
			default:
				t.Errorf("receiver %s: queue full, dropped %T", name, m)
			}
		}
	}()
	return r
}

// recvErrors returns the Recv errors seen so far.
func (r *receiver) recvErrors() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

// next returns the next message that match accepts, skipping keep-alives and
// anything else; it fails the test when ctx ends first.
func (r *receiver) next(ctx context.Context, what string, match func(derp.ReceivedMessage) bool) derp.ReceivedMessage {
	r.t.Helper()
	m, err := r.nextErr(ctx, match)
	if err != nil {
		r.t.Fatalf("%s: waiting for %s: %v (Recv errors: %v)", r.name, what, err, r.recvErrors())
	}
	return m
}

func (r *receiver) nextErr(ctx context.Context, match func(derp.ReceivedMessage) bool) (derp.ReceivedMessage, error) {
	var skipped []string
	for {
		select {
		case m := <-r.msgs:
			if match(m) {
				return m, nil
			}
			if _, ok := m.(derp.KeepAliveMessage); !ok {
				skipped = append(skipped, fmt.Sprintf("%T", m))
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (skipped %v)", ctx.Err(), skipped)
		}
	}
}

// packetFrom matches a ReceivedPacket from src.
func packetFrom(src key.NodePublic) func(derp.ReceivedMessage) bool {
	return func(m derp.ReceivedMessage) bool {
		p, ok := m.(derp.ReceivedPacket)
		return ok && p.Source == src
	}
}

func isServerInfo(m derp.ReceivedMessage) bool {
	_, ok := m.(derp.ServerInfoMessage)
	return ok
}

// peerGone matches a PeerGone frame about peer with the given reason.
func peerGone(peer key.NodePublic, reason derp.PeerGoneReasonType) func(derp.ReceivedMessage) bool {
	return func(m derp.ReceivedMessage) bool {
		g, ok := m.(derp.PeerGoneMessage)
		return ok && g.Peer == peer && g.Reason == reason
	}
}
