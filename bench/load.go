package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"derpfleet.io/bench/storm"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// benchRegionID is in the 900-999 range kept for self-hosted relays.
const benchRegionID = 900

// probeInterval paces the latency probe: light enough not to add load,
// frequent enough for a p99 over a few seconds.
const probeInterval = 2 * time.Millisecond

// drainQuiet is how long no packet may arrive before a cell counts as drained.
const drainQuiet = 300 * time.Millisecond

// drainTimeout bounds the wait for packets still in flight after senders stop.
const drainTimeout = 5 * time.Second

// timestampLen is the probe's send time (ns since the cell started) at the
// start of its packets.
const timestampLen = 8

// lossTimeout is how long a sender with no credit left waits before it
// counts its oldest packet as dropped and sends anyway.
const lossTimeout = 50 * time.Millisecond

// loadParams is one cell: its shape, the sender→receiver pairs of a cell
// without peers, the packets each pair may have in flight (0: no limit; a
// ring shares the pairs' packets in flight among its senders), how long to
// measure.
type loadParams struct {
	shape    cellShape
	pairs    int
	window   int
	warmup   time.Duration
	duration time.Duration
}

// flow is one sender and its receiver, as indexes into the cell's clients.
type flow struct{ from, to int }

// topology is how many clients a cell connects and who sends to whom:
// pairs (0→1, 2→3, …), or a ring of peers (0→1, 1→2, …, n-1→0), where every
// client both sends and receives. No client receives from two senders, so
// its window is the only limit on its queue in the relay.
func (p loadParams) topology() (clients int, flows []flow) {
	if n := p.shape.Peers; n > 0 {
		for i := range n {
			flows = append(flows, flow{i, (i + 1) % n})
		}
		return n, flows
	}
	for i := range p.pairs {
		flows = append(flows, flow{2 * i, 2*i + 1})
	}
	return 2 * p.pairs, flows
}

// flowWindow is the packets each sender may have in flight. A ring shares
// the pairs' packets in flight among its senders (at least one each): the
// relay then holds the same load over more connections, and with 100 peers
// at the pairs' window each, queues outlast lossTimeout and senders writing
// packets off as lost would flood it.
func (p loadParams) flowWindow() int {
	if p.shape.Peers == 0 || p.window <= 0 {
		return p.window
	}
	return max(1, (p.pairs*p.window+p.shape.Peers/2)/p.shape.Peers)
}

// cellResult is what one cell measured on one relay.
type cellResult struct {
	cellShape
	Sent          int64   `json:"sent"`
	Received      int64   `json:"received"`
	PacketsPerSec float64 `json:"packetsPerSec"`
	MbitPerSec    float64 `json:"mbitPerSec"`
	DropPercent   float64 `json:"dropPercent"`
	// Latency of the probe while the relay carries the flood, and before
	// the flood starts (the relay has nothing else to do).
	LatencyP50Ms     float64 `json:"latencyP50Ms"`
	LatencyP99Ms     float64 `json:"latencyP99Ms"`
	IdleLatencyP50Ms float64 `json:"idleLatencyP50Ms"`
	IdleLatencyP99Ms float64 `json:"idleLatencyP99Ms"`
	CPUSecPerMpkt    float64 `json:"cpuSecPerMpkt"`
	// LoadgenCPU is the share of its core the load generator used in the
	// window: near 1, the load generator (not the relay) was the limit.
	LoadgenCPU float64 `json:"loadgenCpu"`
	// OtherCPU is the cores everything else on the machine used in the
	// window (the machine may be shared): the noise under these figures.
	OtherCPU float64 `json:"otherCpu"`
	// Processes is how many processes the relay's CPU and RSS were summed
	// over (derp-relay --workers N: the supervisor and N workers).
	Processes int `json:"processes,omitempty"`
}

// regionOf is a one-node DERP region for srv, pinned to the bench certificate.
func regionOf(srv *server, cert *benchCert) *tailcfg.DERPRegion {
	return &tailcfg.DERPRegion{
		RegionID:   benchRegionID,
		RegionCode: "bench",
		Nodes: []*tailcfg.DERPNode{{
			Name:     "900a",
			RegionID: benchRegionID,
			HostName: benchHost,
			IPv4:     benchHost,
			STUNPort: -1,
			DERPPort: srv.port,
			CertName: "sha256-raw:" + cert.pin,
		}},
	}
}

// connectClient connects a derphttp client the way magicsock connects to
// its home region.
func connectClient(ctx context.Context, region *tailcfg.DERPRegion) (*derphttp.Client, error) {
	c := derphttp.NewRegionClient(key.NewNode(), logger.Discard, netmon.NewStatic(),
		func() *tailcfg.DERPRegion { return region })
	if err := c.Connect(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// runCell measures one cell: a paced probe pair alone for the warm-up time
// (idle latency), then the cell's senders flooding for warmup+duration with
// the probe still running; throughput and CPU count over the window only.
func runCell(ctx context.Context, srv *server, cert *benchCert, p loadParams) (cellResult, error) {
	res := cellResult{cellShape: p.shape}
	region := regionOf(srv, cert)
	n, flows := p.topology()
	clients := make([]*derphttp.Client, 0, n+2)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for range n + 2 { // the last two are the latency probe's sender and receiver
		c, err := connectClient(ctx, region)
		if err != nil {
			return res, fmt.Errorf("connecting clients: %w", err)
		}
		clients = append(clients, c)
	}
	probe := flow{n, n + 1}
	for _, f := range append(flows, probe) {
		if err := storm.AwaitServerInfo(clients[f.to]); err != nil {
			return res, fmt.Errorf("handshake: %w", err)
		}
	}

	var sent, received, receivedBytes atomic.Int64
	var stop atomic.Bool
	var senders, receivers sync.WaitGroup
	epoch := time.Now()
	var probeMu sync.Mutex
	var probes []probeSample

	receivers.Go(func() {
		for {
			m, err := clients[probe.to].Recv()
			if err != nil {
				return
			}
			pkt, ok := m.(derp.ReceivedPacket)
			if !ok || len(pkt.Data) < timestampLen {
				continue
			}
			now := time.Since(epoch)
			sentAt := time.Duration(binary.BigEndian.Uint64(pkt.Data))
			probeMu.Lock()
			probes = append(probes, probeSample{sentAt: sentAt, latency: now - sentAt})
			probeMu.Unlock()
		}
	})
	senders.Go(func() {
		pkt := make([]byte, max(p.shape.Size, timestampLen))
		from, dst := clients[probe.from], clients[probe.to].SelfPublicKey()
		tick := time.NewTicker(probeInterval)
		defer tick.Stop()
		for !stop.Load() {
			<-tick.C
			binary.BigEndian.PutUint64(pkt, uint64(time.Since(epoch)))
			if from.Send(dst, pkt) != nil {
				return
			}
		}
	})
	// The probe alone first: latency of a relay with nothing else to do.
	sleepCtx(ctx, p.warmup)
	idleWindow := [2]time.Duration{probeInterval, time.Since(epoch)}

	for _, f := range flows {
		from, to := clients[f.from], clients[f.to]
		credit := newCredit(p.flowWindow())
		receivers.Go(func() {
			for {
				m, err := to.Recv()
				if err != nil {
					return
				}
				if pkt, ok := m.(derp.ReceivedPacket); ok {
					received.Add(1)
					receivedBytes.Add(int64(len(pkt.Data)))
					credit.give()
				}
			}
		})
		dst := to.SelfPublicKey()
		senders.Go(func() {
			pkt := make([]byte, p.shape.Size)
			for !stop.Load() {
				credit.take()
				if from.Send(dst, pkt) != nil {
					return
				}
				sent.Add(1)
			}
		})
	}

	sleepCtx(ctx, p.warmup)
	r0, b0 := received.Load(), receivedBytes.Load()
	cpu0, err1 := srv.cpuSeconds()
	own0, err2 := procCPUSeconds(os.Getpid())
	all0, err5 := machineBusySeconds()
	t0 := time.Now()
	sleepCtx(ctx, p.duration)
	r1, b1 := received.Load(), receivedBytes.Load()
	cpu1, err3 := srv.cpuSeconds()
	res.Processes = len(processTree(srv.cmd.Process.Pid))
	own1, err4 := procCPUSeconds(os.Getpid())
	all1, err6 := machineBusySeconds()
	elapsed := time.Since(t0)
	loadWindow := [2]time.Duration{t0.Sub(epoch), time.Since(epoch)}
	stop.Store(true)
	if err := errors.Join(err1, err2, err3, err4, err5, err6, ctx.Err()); err != nil {
		return res, err
	}

	senders.Wait()
	drain(&received)
	for _, c := range clients {
		c.Close()
	}
	receivers.Wait()
	clients = nil
	if err := srv.alive(); err != nil {
		return res, err
	}

	res.Sent, res.Received = sent.Load(), received.Load()
	if res.Sent > 0 {
		res.DropPercent = 100 * float64(res.Sent-res.Received) / float64(res.Sent)
	}
	secs := elapsed.Seconds()
	delivered := float64(r1 - r0)
	res.PacketsPerSec = delivered / secs
	res.MbitPerSec = float64(b1-b0) * 8 / secs / 1e6
	if delivered > 0 {
		res.CPUSecPerMpkt = (cpu1 - cpu0) / (delivered / 1e6)
	}
	res.LoadgenCPU = (own1 - own0) / secs
	res.OtherCPU = max(0, (all1-all0)-(cpu1-cpu0)-(own1-own0)) / secs
	res.IdleLatencyP50Ms, res.IdleLatencyP99Ms = latencyIn(probes, idleWindow)
	res.LatencyP50Ms, res.LatencyP99Ms = latencyIn(probes, loadWindow)
	return res, nil
}

// probeSample is one probe packet: when it was sent (since the cell began)
// and how long the relay took to deliver it.
type probeSample struct {
	sentAt, latency time.Duration
}

// latencyIn is p50 and p99, in milliseconds, of the probes sent in window.
func latencyIn(samples []probeSample, window [2]time.Duration) (p50, p99 float64) {
	var in []time.Duration
	for _, s := range samples {
		if s.sentAt >= window[0] && s.sentAt < window[1] {
			in = append(in, s.latency)
		}
	}
	if len(in) == 0 {
		return 0, 0
	}
	slices.Sort(in)
	return percentile(in, 0.50), percentile(in, 0.99)
}

// credit limits the packets a sender has in flight: a relay that keeps up
// never sees a queue longer than the window, so the figures measure its
// capacity rather than how it sheds an overload. nil means no limit.
type credit chan struct{}

func newCredit(window int) credit {
	if window <= 0 {
		return nil
	}
	c := make(credit, window)
	for range window {
		c <- struct{}{}
	}
	return c
}

// take waits for a free slot, or lossTimeout (the packet in flight was lost).
func (c credit) take() {
	if c == nil {
		return
	}
	select {
	case <-c:
		return
	default:
	}
	t := time.NewTimer(lossTimeout)
	defer t.Stop()
	select {
	case <-c:
	case <-t.C:
	}
}

// give returns a slot when a packet arrived.
func (c credit) give() {
	select {
	case c <- struct{}{}:
	default: // the slot was already written off by take
	}
}

// drain waits until no more packets arrive (the relay's queues are empty).
func drain(received *atomic.Int64) {
	deadline := time.Now().Add(drainTimeout)
	last := received.Load()
	for time.Now().Before(deadline) {
		time.Sleep(drainQuiet)
		now := received.Load()
		if now == last {
			return
		}
		last = now
	}
}

// percentile of sorted durations, in milliseconds (nearest rank).
func percentile(sorted []time.Duration, q float64) float64 {
	i := min(int(q*float64(len(sorted))), len(sorted)-1)
	return float64(sorted[i]) / float64(time.Millisecond)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
