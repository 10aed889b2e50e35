package storm

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// ProbeInterval paces each innocent pair: light next to a storm, frequent
// enough that a stall of the relay shows in every percentile.
const ProbeInterval = 2 * time.Millisecond

// probeQuiet is how long no probe may arrive before the last are counted lost.
const probeQuiet = 300 * time.Millisecond

// Probes are innocent pairs of derphttp clients, each sending a
// timestamped packet every ProbeInterval, from connect until Finish.
type Probes struct {
	pairs     [][2]*derphttp.Client
	stop      atomic.Bool
	sent      atomic.Int64
	senders   sync.WaitGroup
	receivers sync.WaitGroup
	mu        sync.Mutex
	got       []Sample
}

// Sample is one probe packet: when it was sent and how long the relay took
// to deliver it (both ends in one process, so one clock).
type Sample struct {
	SentAt  time.Time     `json:"sentAt"`
	Latency time.Duration `json:"latency"`
}

// StartProbes connects n pairs to the region's relay, as magicsock
// connects to its home region, and starts their probes.
func StartProbes(ctx context.Context, region *tailcfg.DERPRegion, n int) (*Probes, error) {
	ps := &Probes{}
	for range n {
		var pair [2]*derphttp.Client
		for i := range pair {
			pair[i] = derphttp.NewRegionClient(key.NewNode(), logger.Discard, netmon.NewStatic(),
				func() *tailcfg.DERPRegion { return region })
		}
		ps.pairs = append(ps.pairs, pair)
		for _, c := range pair {
			if err := c.Connect(ctx); err != nil {
				ps.Close()
				return nil, fmt.Errorf("connecting an innocent pair: %w", err)
			}
		}
	}
	for _, pair := range ps.pairs {
		if err := AwaitServerInfo(pair[1]); err != nil {
			ps.Close()
			return nil, fmt.Errorf("innocent pair handshake: %w", err)
		}
	}
	for _, pair := range ps.pairs {
		ps.receivers.Go(func() { ps.receive(pair[1]) })
		ps.senders.Go(func() { ps.send(pair[0], pair[1].SelfPublicKey()) })
	}
	return ps, nil
}

func (ps *Probes) send(from *derphttp.Client, to key.NodePublic) {
	pkt := make([]byte, 64)
	tick := time.NewTicker(ProbeInterval)
	defer tick.Stop()
	for !ps.stop.Load() {
		<-tick.C
		binary.BigEndian.PutUint64(pkt, uint64(time.Now().UnixNano()))
		if from.Send(to, pkt) != nil {
			return
		}
		ps.sent.Add(1)
	}
}

func (ps *Probes) receive(c *derphttp.Client) {
	for {
		m, err := c.Recv()
		if err != nil {
			return
		}
		pkt, ok := m.(derp.ReceivedPacket)
		if !ok || len(pkt.Data) < 8 {
			continue
		}
		sentAt := time.Unix(0, int64(binary.BigEndian.Uint64(pkt.Data)))
		ps.mu.Lock()
		ps.got = append(ps.got, Sample{SentAt: sentAt, Latency: time.Since(sentAt)})
		ps.mu.Unlock()
	}
}

// Finish stops the senders, lets the last probes arrive and returns how
// many never did.
func (ps *Probes) Finish() (lost int64) {
	ps.stop.Store(true)
	ps.senders.Wait()
	received := len(ps.Samples())
	for {
		time.Sleep(probeQuiet)
		n := len(ps.Samples())
		if n == received {
			return ps.sent.Load() - int64(received)
		}
		received = n
	}
}

// Samples is every probe received so far.
func (ps *Probes) Samples() []Sample {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return slices.Clone(ps.got)
}

// Close disconnects every pair.
func (ps *Probes) Close() {
	ps.stop.Store(true)
	for _, pair := range ps.pairs {
		pair[0].Close()
		pair[1].Close()
	}
	ps.receivers.Wait()
}

// Latency is p50, p99 and the maximum, in milliseconds, of the probes sent
// in [from, to).
func Latency(samples []Sample, from, to time.Time) (p50, p99, longest float64) {
	var in []time.Duration
	for _, s := range samples {
		if !s.SentAt.Before(from) && s.SentAt.Before(to) {
			in = append(in, s.Latency)
		}
	}
	if len(in) == 0 {
		return 0, 0, 0
	}
	slices.Sort(in)
	return ms(rank(in, 0.50)), ms(rank(in, 0.99)), ms(in[len(in)-1])
}
