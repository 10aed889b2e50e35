package main

// The storm figures (-storm): how many DERP handshakes a relay completes
// while thousands of clients connect and hang up as fast as they can, and
// how long packets of innocent pairs, connected before the storm, wait
// meanwhile. Each round starts a fresh relay of each kind (interleaved, as
// the load cells) and every figure is reported as a ratio to derper's.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"time"

	"derpfleet.io/bench/storm"
)

var (
	stormMode     = flag.Bool("storm", false, "measure handshakes/s and innocent pairs' latency during a connection storm, instead of the load cells")
	stormConns    = flag.Int("storm-conns", 3000, "storm clients, each connecting, finishing the DERP handshake and hanging up in a loop")
	stormDuration = flag.Duration("storm-duration", 10*time.Second, "how long the storm lasts")
	stormTimeout  = flag.Duration("storm-timeout", 5*time.Second, "a storm client gives up a handshake (TCP, TLS, upgrade, ServerInfo) after this long")
	stormBackoff  = flag.Duration("storm-backoff", 100*time.Millisecond, "a storm client waits this long after a refused or timed-out handshake")
	stormPairs    = flag.Int("storm-pairs", 2, "innocent client pairs (with --workers, some likely span two workers)")
)

// init: this process may be the innocent pairs' child process of a -storm run.
func init() { storm.RunProbeChildIfAsked() }

// stormDrain is how long attempts in flight may still finish after the
// storm stops, past their timeout (they count in the outcomes, not the rate).
const stormDrain = time.Second

// stormParams is one storm: its clients, length and patience.
type stormParams struct {
	Conns       int     `json:"conns"`
	DurationSec float64 `json:"durationSec"`
	TimeoutSec  float64 `json:"timeoutSec"`
	BackoffSec  float64 `json:"backoffSec"`
	WarmupSec   float64 `json:"warmupSec"`
	Pairs       int     `json:"pairs"`
}

// stormResult is what one storm measured on one relay.
type stormResult struct {
	Server serverKind `json:"server"`
	Round  int        `json:"round,omitempty"`
	// Outcomes of every attempt (see storm.Tally).
	Attempts int64 `json:"attempts"`
	Served   int64 `json:"served"`
	Refused  int64 `json:"refused"`
	TimedOut int64 `json:"timedOut"`
	Failed   int64 `json:"failed"`
	// HandshakesPerSec counts handshakes completed within the storm.
	HandshakesPerSec float64 `json:"handshakesPerSec"`
	// CPUMsPerHandshake is the relay's CPU over the storm per completed
	// handshake (refusals and hang-ups included): handshakes/s per core is
	// its inverse.
	CPUMsPerHandshake float64 `json:"cpuMsPerHandshake"`
	HandshakeP50Ms    float64 `json:"handshakeP50Ms"`
	HandshakeP99Ms    float64 `json:"handshakeP99Ms"`
	// The innocent pairs' one-way latency before and during the storm,
	// and the probes they lost.
	IdleLatencyP99Ms float64 `json:"idleLatencyP99Ms"`
	LatencyP50Ms     float64 `json:"latencyP50Ms"`
	LatencyP99Ms     float64 `json:"latencyP99Ms"`
	LatencyMaxMs     float64 `json:"latencyMaxMs"`
	ProbesLost       int64   `json:"probesLost"`
	// RelayCPU is the cores the relay used during the storm.
	RelayCPU   float64 `json:"relayCpu"`
	LoadgenCPU float64 `json:"loadgenCpu"`
	OtherCPU   float64 `json:"otherCpu"`
}

// stormResults is the JSON a -storm run writes.
type stormResults struct {
	Machine machine                    `json:"machine"`
	Params  stormParams                `json:"params"`
	Config  config                     `json:"config"`
	Runs    []stormResult              `json:"runs"`
	Median  map[serverKind]stormResult `json:"median"`
}

// runStorm measures every server in interleaved rounds and writes the
// results (JSON, markdown) where asked.
func runStorm(ctx context.Context, cfg config, specs []serverSpec, beforeCommit, jsonOut, markdownOut string) error {
	p := stormParams{
		Conns: *stormConns, DurationSec: stormDuration.Seconds(), TimeoutSec: stormTimeout.Seconds(),
		BackoffSec: stormBackoff.Seconds(), WarmupSec: cfg.WarmupSec, Pairs: *stormPairs,
	}
	cert, err := newBenchCert()
	if err != nil {
		return err
	}
	r := &stormResults{Machine: describeMachine(specs[0].binary, specs[1].binary), Params: p, Config: cfg}
	r.Machine.BeforeCommit = beforeCommit
	log.Printf("storm: %d clients for %v (timeout %v, backoff %v), %d innocent pairs; relays on CPUs %s, %d round(s)",
		p.Conns, *stormDuration, *stormTimeout, *stormBackoff, p.Pairs, cfg.RelayCPUs, cfg.Rounds)
	for round := 1; round <= cfg.Rounds; round++ {
		for _, spec := range specs {
			prefix := fmt.Sprintf("[round %d/%d] %-10s", round, cfg.Rounds, spec.kind)
			res, err := stormRound(ctx, spec, cert, p)
			if err != nil {
				return fmt.Errorf("%s storm: %w", prefix, err)
			}
			res.Server, res.Round = spec.kind, round
			log.Printf("%s %6.0f handshakes/s (%.2f CPU ms each; p50/p99 %.0f/%.0f ms)  served %d refused %d timed out %d failed %d  "+
				"pair p50/p99/max %.2f/%.2f/%.2f ms (idle p99 %.2f) lost %d  (relay %.0f%%, load generator %.0f%%, others %.0f%% CPU)",
				prefix, res.HandshakesPerSec, res.CPUMsPerHandshake, res.HandshakeP50Ms, res.HandshakeP99Ms,
				res.Served, res.Refused, res.TimedOut, res.Failed,
				res.LatencyP50Ms, res.LatencyP99Ms, res.LatencyMaxMs, res.IdleLatencyP99Ms, res.ProbesLost,
				100*res.RelayCPU, 100*res.LoadgenCPU, 100*res.OtherCPU)
			r.Runs = append(r.Runs, res)
		}
	}
	r.summarise()
	fmt.Println()
	r.writeTables(os.Stdout)
	if jsonOut != "" {
		data, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(jsonOut, append(data, '\n'), 0o644); err != nil {
			return err
		}
		log.Printf("results in %s", jsonOut)
	}
	if markdownOut != "" {
		if err := os.WriteFile(markdownOut, []byte(r.markdown()), 0o644); err != nil {
			return err
		}
		log.Printf("rendered %s", markdownOut)
	}
	return nil
}

// stormRound starts a fresh relay, connects the innocent pairs, lets them
// run alone for the warm-up, then alongside the storm.
func stormRound(ctx context.Context, spec serverSpec, cert *benchCert, p stormParams) (stormResult, error) {
	var res stormResult
	srv, dir, err := freshServer(ctx, spec, cert)
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	defer srv.stop()

	probes, err := storm.SpawnProbes(os.Args[0], nil, regionOf(srv, cert), p.Pairs)
	if err != nil {
		return res, err
	}
	sleepCtx(ctx, time.Duration(p.WarmupSec*float64(time.Second)))
	idleEnd := time.Now()

	timeout := time.Duration(p.TimeoutSec * float64(time.Second))
	cpu0, err1 := srv.cpuSeconds()
	own0, err2 := procCPUSeconds(os.Getpid())
	all0, err3 := machineBusySeconds()
	t0 := time.Now()
	s := storm.Start(ctx, storm.Config{
		Addr: srv.addr(), TLS: cert.stormTLSConfig(), Clients: p.Conns,
		Timeout: timeout, Backoff: time.Duration(p.BackoffSec * float64(time.Second)),
	})
	sleepCtx(ctx, time.Duration(p.DurationSec*float64(time.Second)))
	s.Stop()
	stormEnd := time.Now()
	cpu1, err4 := srv.cpuSeconds()
	own1, err5 := procCPUSeconds(os.Getpid())
	all1, err6 := machineBusySeconds()
	if !s.Wait(timeout + stormDrain) {
		log.Printf("storm: clients still busy %v after the storm", timeout+stormDrain)
	}
	samples, lost, err7 := probes.Finish()
	if err := errors.Join(err1, err2, err3, err4, err5, err6, err7, ctx.Err()); err != nil {
		return res, err
	}
	if err := srv.alive(); err != nil {
		return res, err
	}

	t := s.Tally()
	secs := stormEnd.Sub(t0).Seconds()
	res.Attempts, res.Served, res.Refused, res.TimedOut, res.Failed = t.Attempts, t.Served, t.Refused, t.TimedOut, t.Failed
	inWindow := t.ServedBy(stormEnd)
	res.HandshakesPerSec = float64(inWindow) / secs
	if inWindow > 0 {
		res.CPUMsPerHandshake = 1000 * (cpu1 - cpu0) / float64(inWindow)
	}
	res.HandshakeP50Ms, res.HandshakeP99Ms = t.HandshakePercentiles()
	res.ProbesLost = lost
	_, res.IdleLatencyP99Ms, _ = storm.Latency(samples, time.Time{}, idleEnd)
	res.LatencyP50Ms, res.LatencyP99Ms, res.LatencyMaxMs = storm.Latency(samples, t0, stormEnd)
	res.RelayCPU = (cpu1 - cpu0) / secs
	res.LoadgenCPU = (own1 - own0) / secs
	res.OtherCPU = max(0, (all1-all0)-(cpu1-cpu0)-(own1-own0)) / secs
	return res, nil
}

// stormTLSConfig is the pinned client configuration with X25519 as the only
// key exchange: Go's default adds X25519MLKEM768, which derper (Go) would
// pick and OpenSSL 3.0 cannot, so the relays would not do the same TLS work.
func (c *benchCert) stormTLSConfig() *tls.Config {
	cfg := c.tlsConfig()
	cfg.CurvePreferences = []tls.CurveID{tls.X25519}
	return cfg
}

// summarise fills Median with the median of every figure over the rounds.
func (r *stormResults) summarise() {
	r.Median = map[serverKind]stormResult{}
	for _, kind := range serverKinds {
		runs := runsOf(r.Runs, kind, func(run stormResult) serverKind { return run.Server })
		if len(runs) == 0 {
			continue
		}
		m := stormResult{Server: kind}
		for _, fig := range stormFigures {
			fig.set(&m, medianOf(runs, fig.get))
		}
		r.Median[kind] = m
	}
}

// stormFigure is one row of the storm table.
type stormFigure struct {
	name   string
	format string
	get    func(stormResult) float64
	set    func(*stormResult, float64)
}

func countFigure(name string, field func(*stormResult) *int64) stormFigure {
	return stormFigure{name, "%.0f",
		func(r stormResult) float64 { return float64(*field(&r)) },
		func(r *stormResult, v float64) { *field(r) = int64(v) }}
}

func valueFigure(name, format string, field func(*stormResult) *float64) stormFigure {
	return stormFigure{name, format,
		func(r stormResult) float64 { return *field(&r) },
		func(r *stormResult, v float64) { *field(r) = v }}
}

var stormFigures = []stormFigure{
	valueFigure("handshakes/s completed during the storm", "%.0f", func(r *stormResult) *float64 { return &r.HandshakesPerSec }),
	valueFigure("relay CPU ms per completed handshake", "%.2f", func(r *stormResult) *float64 { return &r.CPUMsPerHandshake }),
	valueFigure("handshake p50 (ms, TCP connect to ServerInfo)", "%.1f", func(r *stormResult) *float64 { return &r.HandshakeP50Ms }),
	valueFigure("handshake p99 (ms)", "%.1f", func(r *stormResult) *float64 { return &r.HandshakeP99Ms }),
	countFigure("attempts", func(r *stormResult) *int64 { return &r.Attempts }),
	countFigure("served", func(r *stormResult) *int64 { return &r.Served }),
	countFigure("refused (closed or reset by the relay)", func(r *stormResult) *int64 { return &r.Refused }),
	countFigure("timed out (left hanging)", func(r *stormResult) *int64 { return &r.TimedOut }),
	countFigure("failed otherwise", func(r *stormResult) *int64 { return &r.Failed }),
	valueFigure("innocent pairs: latency p50 during the storm (ms)", "%.2f", func(r *stormResult) *float64 { return &r.LatencyP50Ms }),
	valueFigure("innocent pairs: latency p99 during the storm (ms)", "%.2f", func(r *stormResult) *float64 { return &r.LatencyP99Ms }),
	valueFigure("innocent pairs: latency max during the storm (ms)", "%.2f", func(r *stormResult) *float64 { return &r.LatencyMaxMs }),
	valueFigure("innocent pairs: latency p99 before the storm (ms)", "%.3f", func(r *stormResult) *float64 { return &r.IdleLatencyP99Ms }),
	countFigure("innocent pairs: probes lost", func(r *stormResult) *int64 { return &r.ProbesLost }),
	valueFigure("relay CPU (cores)", "%.2f", func(r *stormResult) *float64 { return &r.RelayCPU }),
	valueFigure("load generator CPU (share of its core)", "%.2f", func(r *stormResult) *float64 { return &r.LoadgenCPU }),
	valueFigure("other processes' CPU (cores)", "%.2f", func(r *stormResult) *float64 { return &r.OtherCPU }),
}

// writeTables prints derp-relay against derper, and against derp-relay-before if measured.
func (r *stormResults) writeTables(w io.Writer) {
	table := func(a, b serverKind, aName, bName string) {
		fmt.Fprintf(w, "| figure | %s | %s | %s / %s |\n| --- | ---: | ---: | ---: |\n", aName, bName, aName, bName)
		for _, fig := range stormFigures {
			va, vb := fig.get(r.Median[a]), fig.get(r.Median[b])
			fmt.Fprintf(w, "| %s | "+fig.format+" | "+fig.format+" | %s |\n", fig.name, va, vb, ratio(va, vb))
		}
	}
	table(ours, theirs, string(ours), string(theirs))
	if _, ok := r.Median[before]; ok {
		fmt.Fprintf(w, "\nderp-relay before (%s) and after (%s), in the same rounds:\n\n", r.Machine.BeforeCommit, r.Machine.Commit)
		table(ours, before, "after", "before")
	}
}

// markdown is STORM.md: the machine, what was done, the tables.
func (r *stormResults) markdown() string {
	p := r.Params
	var b strings.Builder
	fmt.Fprintln(&b, "# Connection storm: derp-relay vs. Tailscale's derper")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Generated by `bench/run -storm` (`make bench-storm`) into `bench/storm.json` and this file; do not edit by hand.")
	fmt.Fprintln(&b)
	r.Machine.writeMarkdown(&b)
	fmt.Fprintln(&b)
	fmt.Fprintf(&b, "Median of %d interleaved rounds per server. Each round starts the relay afresh, "+
		"connects %d innocent derphttp pairs that send a timestamped probe every %v, waits %.0f s, then "+
		"%d storm clients connect (TCP, TLS, `Upgrade: DERP` with fast start, ClientInfo, until "+
		"ServerInfo) and hang up, again and again, for %.0f s; a client gives up after %.0f s and waits "+
		"%.0f ms after a refusal or a timeout. Relays pinned to CPUs %s, the load generator to CPU %d.%s\n\n",
		r.Config.Rounds, p.Pairs, storm.ProbeInterval, p.WarmupSec, p.Conns, p.DurationSec, p.TimeoutSec,
		1000*p.BackoffSec, r.Config.relayCPUs(), r.Config.LoadCPU, r.Config.workersNote())
	r.writeTables(&b)
	return b.String()
}
