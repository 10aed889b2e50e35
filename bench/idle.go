package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"derpfleet.io/bench/storm"
	"tailscale.com/types/key"
)

// idleDialers is how many idle connections are being set up at once.
const idleDialers = 32

// idleSources spreads idle connections over this many loopback source
// addresses (127.0.1.1 ...): a dial bound to an address takes a port of that
// address's own ~28k ephemeral ports, so 50k connections per round (780 per
// address), several rounds in a row, never run out of ports (the closed
// ones stay in TIME_WAIT for a minute).
const idleSources = 64

// idleFDSlack is the descriptors a relay and this load generator need
// besides their idle connections (listeners, pipes, the clients of a cell,
// the files of the Python runtime).
const idleFDSlack = 500

// idleDialTimeout bounds one idle connection's TCP, TLS and DERP handshakes.
const idleDialTimeout = 30 * time.Second

// idleSettle is how long the relay gets after the last handshake before its
// RSS is read.
const idleSettle = 2 * time.Second

// idleResult is the relay's RSS with Conns idle DERP clients connected.
type idleResult struct {
	Conns    int   `json:"conns"`
	RSSBytes int64 `json:"rssBytes"`
}

// raiseNoFileLimit lifts this process's descriptor limit (RLIMIT_NOFILE) to
// its hard limit, which the relays it starts inherit, and returns it.
func raiseNoFileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, err
	}
	l.Cur = l.Max
	return l.Max, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
}

// fitIdleLevels lowers the idle levels (ascending) that a process limited
// to limit descriptors cannot hold, to the largest thousand it can: derper
// and a derp-relay worker hold all their connections in one process, and
// raising the hard limit needs CAP_SYS_RESOURCE. asked is the levels as
// given when any was lowered, else nil.
func fitIdleLevels(levels []int, limit uint64) (fitted, asked []int) {
	most := int(min(limit, 1<<30)) - idleFDSlack
	most = max(most-most%1000, 1)
	for _, n := range levels {
		fitted = append(fitted, min(n, most))
	}
	fitted = slices.Compact(fitted)
	if !slices.Equal(fitted, levels) {
		asked = levels
	}
	return fitted, asked
}

// idleConns holds connections that finished the DERP handshake and then say
// nothing: what most of a relay's clients do most of the time. They are
// lean (TLS, the upgrade request, the derp package's handshake) because
// derphttp clients would cost the load generator far more memory.
type idleConns struct {
	conns []net.Conn
}

// growTo opens connections until there are target of them.
func (s *idleConns) growTo(ctx context.Context, addr string, cfg *tls.Config, target int) error {
	need := target - len(s.conns)
	if need <= 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	var firstErr error
	next := make(chan int)
	var wg sync.WaitGroup
	for range idleDialers {
		wg.Go(func() {
			for i := range next {
				conn, err := dialIdle(ctx, addr, cfg, i)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("idle connection %d: %w", i, err)
					cancel()
				}
				if conn != nil {
					s.conns = append(s.conns, conn)
				}
				mu.Unlock()
			}
		})
	}
	start := len(s.conns)
feed:
	for i := start; i < target; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

func (s *idleConns) close() {
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// dialIdle connects from the i-th source address, completes TLS, the HTTP
// upgrade and the DERP handshake up to ServerInfo, and returns the
// connection for the caller to leave idle.
func dialIdle(ctx context.Context, addr string, cfg *tls.Config, i int) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, idleDialTimeout)
	defer cancel()
	source := net.IPv4(127, 0, 1, byte(1+i%idleSources))
	dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: source}}
	tcp, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	conn := tls.Client(tcp, cfg)
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	if err := handshakeIdle(ctx, conn); err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

func handshakeIdle(ctx context.Context, conn *tls.Conn) error {
	if err := conn.HandshakeContext(ctx); err != nil {
		return err
	}
	return storm.DERPHandshake(conn, key.NewNode())
}

// measureIdle opens each number of idle connections in turn (ascending)
// and reads the relay's RSS once they are all connected.
func measureIdle(ctx context.Context, srv *server, cert *benchCert, levels []int) ([]idleResult, error) {
	var idle idleConns
	defer idle.close()
	cfg := cert.tlsConfig()
	base, err := srv.rssBytes()
	if err != nil {
		return nil, err
	}
	out := []idleResult{{Conns: 0, RSSBytes: base}}
	for _, n := range levels {
		start := time.Now()
		if err := idle.growTo(ctx, srv.addr(), cfg, n); err != nil {
			return out, err
		}
		log.Printf("%s: %d idle connections up in %.1f s", srv.spec.kind, n, time.Since(start).Seconds())
		sleepCtx(ctx, idleSettle)
		rss, err := srv.rssBytes()
		if err != nil {
			return out, err
		}
		out = append(out, idleResult{Conns: n, RSSBytes: rss})
	}
	return out, srv.alive()
}
