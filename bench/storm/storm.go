// Package storm is a connection storm against a DERP relay, and the
// latency of an innocent pair of clients meanwhile: the load behind
// `bench -storm` and behind the interop test that holds derp-relay to
// derper's figures (e2e/interop/storm_test.go).
//
// A storm client is what a relay sees when thousands of clients reconnect
// at once: TCP, TLS, `Upgrade: DERP` with fast start, ClientInfo, until
// ServerInfo, then it hangs up and starts again. Its DERP side is
// Tailscale's own derp client code.
package storm

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// sources spreads storm connections over this many loopback source
// addresses (127.0.2.1 ...): thousands of handshakes a second leave their
// client ports in TIME_WAIT for a minute.
const sources = 128

// upgradeRequest asks for DERP with fast start, as derphttp does.
const upgradeRequest = "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
	"Upgrade: DERP\r\nConnection: Upgrade\r\n" + derp.FastStartHeader + ": 1\r\n\r\n"

// Config says where the storm goes and how its clients behave.
type Config struct {
	Addr    string      // the relay's host:port
	TLS     *tls.Config // nil: plain TCP
	Clients int         // clients looping at once
	// Timeout bounds one attempt, TCP connect to ServerInfo; Backoff is
	// the pause after an attempt that was refused or timed out.
	Timeout, Backoff time.Duration
}

// Tally is what the storm's attempts came to.
type Tally struct {
	// Served: ServerInfo arrived. Refused: the relay closed or reset the
	// connection first (a clean answer). TimedOut: the client gave up (the
	// relay left it hanging). Failed: anything else.
	Attempts, Served, Refused, TimedOut, Failed int64
	// ServedAt is when each served attempt finished, Handshakes how long it took.
	ServedAt   []time.Time
	Handshakes []time.Duration
}

// ServedBy counts the attempts served by t.
func (t Tally) ServedBy(at time.Time) int64 {
	var n int64
	for _, done := range t.ServedAt {
		if !done.After(at) {
			n++
		}
	}
	return n
}

// HandshakePercentiles is p50 and p99 of the served attempts, in milliseconds.
func (t Tally) HandshakePercentiles() (p50, p99 float64) {
	if len(t.Handshakes) == 0 {
		return 0, 0
	}
	sorted := slices.Clone(t.Handshakes)
	slices.Sort(sorted)
	return ms(rank(sorted, 0.50)), ms(rank(sorted, 0.99))
}

// Storm is a running storm.
type Storm struct {
	cfg                       Config
	stopping                  atomic.Bool
	clients                   sync.WaitGroup
	attempts, served, refused atomic.Int64
	timedOut, failed          atomic.Int64
	mu                        sync.Mutex
	servedAt                  []time.Time
	handshakes                []time.Duration
}

// Start sets cfg.Clients clients going; each keeps one node key (a client
// reconnecting keeps its key) and its own source address.
func Start(ctx context.Context, cfg Config) *Storm {
	s := &Storm{cfg: cfg}
	for i := range cfg.Clients {
		s.clients.Go(func() { s.client(ctx, i) })
	}
	return s
}

// Stop tells the clients to start no new attempt.
func (s *Storm) Stop() { s.stopping.Store(true) }

// Wait lets the attempts in flight finish, for at most limit; false if some did not.
func (s *Storm) Wait(limit time.Duration) bool {
	done := make(chan struct{})
	go func() {
		s.clients.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(limit):
		return false
	}
}

// Tally is a snapshot of the outcomes so far.
func (s *Storm) Tally() Tally {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Tally{
		Attempts: s.attempts.Load(), Served: s.served.Load(), Refused: s.refused.Load(),
		TimedOut: s.timedOut.Load(), Failed: s.failed.Load(),
		ServedAt: slices.Clone(s.servedAt), Handshakes: slices.Clone(s.handshakes),
	}
}

func (s *Storm) client(ctx context.Context, i int) {
	node := key.NewNode()
	source := &net.TCPAddr{IP: net.IPv4(127, 0, 2, byte(1+i%sources))}
	for !s.stopping.Load() && ctx.Err() == nil {
		s.attempts.Add(1)
		began := time.Now()
		err := s.handshake(ctx, node, source)
		took := time.Since(began)
		switch {
		case err == nil:
			s.served.Add(1)
			s.mu.Lock()
			s.servedAt = append(s.servedAt, began.Add(took))
			s.handshakes = append(s.handshakes, took)
			s.mu.Unlock()
			continue
		case took >= s.cfg.Timeout:
			s.timedOut.Add(1)
		case isRefusal(err):
			s.refused.Add(1)
		default:
			if s.failed.Add(1) <= 3 {
				log.Printf("storm: handshake failed: %v", err)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(s.cfg.Backoff):
		}
	}
}

// handshake connects, completes TLS, asks for DERP with fast start and
// waits for ServerInfo, then hangs up, all within the timeout. A timer
// closes the connection at the deadline (derp's Recv sets read deadlines
// of its own).
func (s *Storm) handshake(ctx context.Context, node key.NodePrivate, source *net.TCPAddr) error {
	deadline := time.Now().Add(s.cfg.Timeout)
	dialer := net.Dialer{LocalAddr: source, Deadline: deadline}
	tcp, err := dialer.DialContext(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return err
	}
	defer tcp.Close()
	expire := time.AfterFunc(time.Until(deadline), func() { tcp.Close() })
	defer expire.Stop()
	conn := tcp
	if s.cfg.TLS != nil {
		tlsConn := tls.Client(tcp, s.cfg.TLS)
		if err := tlsConn.HandshakeContext(ctx); err != nil {
			return err
		}
		conn = tlsConn
	}
	return DERPHandshake(conn, node)
}

// DERPHandshake asks for DERP with fast start on conn (TLS done) and does
// the DERP handshake as node, with Tailscale's derp client, up to ServerInfo.
func DERPHandshake(conn net.Conn, node key.NodePrivate) error {
	if _, err := conn.Write([]byte(upgradeRequest)); err != nil {
		return err
	}
	brw := bufio.NewReadWriter(bufio.NewReader(conn), bufio.NewWriter(conn))
	client, err := derp.NewClient(node, conn, brw, logger.Discard)
	if err != nil {
		return err
	}
	return AwaitServerInfo(client)
}

// AwaitServerInfo reads up to the ServerInfo frame: from then on the relay
// routes packets to the client.
func AwaitServerInfo(c interface {
	Recv() (derp.ReceivedMessage, error)
}) error {
	for {
		m, err := c.Recv()
		if err != nil {
			return err
		}
		if _, ok := m.(derp.ServerInfoMessage); ok {
			return nil
		}
	}
}

// isRefusal: the relay closed or reset the connection.
func isRefusal(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

func rank(sorted []time.Duration, q float64) time.Duration {
	return sorted[min(int(q*float64(len(sorted))), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
