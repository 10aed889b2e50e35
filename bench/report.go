package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// results is the JSON file a run writes: every round, and the medians.
type results struct {
	Machine machine                   `json:"machine"`
	Config  config                    `json:"config"`
	Runs    []serverRun               `json:"runs"`
	Median  map[serverKind]serverRun  `json:"median"`
	Notes   map[serverKind]serverNote `json:"notes,omitempty"`
}

// config is what was measured, and how.
type config struct {
	Pairs       int     `json:"pairs"`
	Window      int     `json:"window"`
	Sizes       []int   `json:"sizes"`
	WarmupSec   float64 `json:"warmupSec"`
	DurationSec float64 `json:"durationSec"`
	Rounds      int     `json:"rounds"`
	Idle        []int   `json:"idle"`
	// IdleRounds is how many of the first rounds measure the idle levels
	// (0, in older results: every round).
	IdleRounds int `json:"idleRounds,omitempty"`
	RelayCPU   int `json:"relayCpu"`
	// RelayCPUs and RelayWorkers: where relays ran and derp-relay's --workers (0: its default).
	RelayCPUs    string `json:"relayCpus,omitempty"`
	RelayWorkers int    `json:"relayWorkers,omitempty"`
	LoadCPU      int    `json:"loadCpu"`
	// Peers: the ring cells' client counts, at PeersSize bytes.
	Peers     []int `json:"peers,omitempty"`
	PeersSize int   `json:"peersSize,omitempty"`
	// SweepWorkers: the workers sweep's worker counts, at SweepSize bytes.
	SweepWorkers []int `json:"sweepWorkers,omitempty"`
	SweepSize    int   `json:"sweepSize,omitempty"`
	// IdleAsked is the idle levels asked for, when the descriptor limit
	// (NoFileLimit, RLIMIT_NOFILE) made Idle lower.
	IdleAsked   []int  `json:"idleAsked,omitempty"`
	NoFileLimit uint64 `json:"noFileLimit,omitempty"`
}

// serverNote is a non-numeric fact about a server (its version).
type serverNote struct {
	Version string `json:"version"`
}

// serverRun is one round of one server (or, in Median, the per-figure median).
type serverRun struct {
	Server serverKind   `json:"server"`
	Round  int          `json:"round,omitempty"`
	Cells  []cellResult `json:"cells"`
	Idle   []idleResult `json:"idle"`
}

// summarise fills Median with the median of every figure over the rounds.
func (r *results) summarise() {
	r.Median = map[serverKind]serverRun{}
	for _, kind := range serverKinds {
		runs := runsOf(r.Runs, kind, func(run serverRun) serverKind { return run.Server })
		if len(runs) == 0 {
			continue
		}
		m := serverRun{Server: kind}
		for i, cell := range runs[0].Cells {
			at := func(f func(cellResult) float64) float64 {
				return medianOf(runs, func(run serverRun) float64 { return f(run.Cells[i]) })
			}
			m.Cells = append(m.Cells, cellResult{
				cellShape:        cell.cellShape,
				Sent:             int64(at(func(c cellResult) float64 { return float64(c.Sent) })),
				Received:         int64(at(func(c cellResult) float64 { return float64(c.Received) })),
				PacketsPerSec:    at(func(c cellResult) float64 { return c.PacketsPerSec }),
				MbitPerSec:       at(func(c cellResult) float64 { return c.MbitPerSec }),
				DropPercent:      at(func(c cellResult) float64 { return c.DropPercent }),
				LatencyP50Ms:     at(func(c cellResult) float64 { return c.LatencyP50Ms }),
				LatencyP99Ms:     at(func(c cellResult) float64 { return c.LatencyP99Ms }),
				IdleLatencyP50Ms: at(func(c cellResult) float64 { return c.IdleLatencyP50Ms }),
				IdleLatencyP99Ms: at(func(c cellResult) float64 { return c.IdleLatencyP99Ms }),
				CPUSecPerMpkt:    at(func(c cellResult) float64 { return c.CPUSecPerMpkt }),
				LoadgenCPU:       at(func(c cellResult) float64 { return c.LoadgenCPU }),
				OtherCPU:         at(func(c cellResult) float64 { return c.OtherCPU }),
				Processes:        cell.Processes,
			})
		}
		idleRuns := slices.DeleteFunc(slices.Clone(runs), func(run serverRun) bool { return len(run.Idle) == 0 })
		if len(idleRuns) > 0 {
			for i, idle := range idleRuns[0].Idle {
				rss := medianOf(idleRuns, func(run serverRun) float64 { return float64(run.Idle[i].RSSBytes) })
				m.Idle = append(m.Idle, idleResult{Conns: idle.Conns, RSSBytes: int64(rss)})
			}
		}
		r.Median[kind] = m
	}
}

// runsOf is the runs of one kind of server, in round order.
func runsOf[T any](runs []T, kind serverKind, server func(T) serverKind) []T {
	var out []T
	for _, run := range runs {
		if server(run) == kind {
			out = append(out, run)
		}
	}
	return out
}

// medianOf is the median of one figure over runs.
func medianOf[T any](runs []T, f func(T) float64) float64 {
	xs := make([]float64, len(runs))
	for i, run := range runs {
		xs[i] = f(run)
	}
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// figure is one row of the table: how to read it from a summary, how to print it.
type figure struct {
	name   string
	format string // for fmt, of the value
	value  func(serverRun) (float64, bool)
}

// figures lists the rows of a run: every cell, the figures that compare
// cells (more peers, more cores), the idle memory.
func figures(cfg config) []figure {
	var out []figure
	for _, shape := range cfg.shapes() {
		out = append(out, cellFigures(shape)...)
	}
	out = append(out, peersFigures(cfg)...)
	out = append(out, sweepFigures(cfg)...)
	return append(out, idleFigures(cfg)...)
}

// cellFigures are the rows of one cell; the peers and sweep cells leave out
// Mbit/s and the idle latency, which the size cells already show.
func cellFigures(shape cellShape) []figure {
	of := func(f func(cellResult) float64) func(serverRun) (float64, bool) {
		return func(s serverRun) (float64, bool) {
			c, ok := s.cell(shape)
			return f(c), ok
		}
	}
	label := shape.label()
	full := shape.Peers == 0 && shape.Workers == 0
	var out []figure
	add := func(always bool, name, format string, f func(cellResult) float64) {
		if always || full {
			out = append(out, figure{name, format, of(f)})
		}
	}
	add(true, packetsFigure(shape), "%.0f", func(c cellResult) float64 { return c.PacketsPerSec })
	add(false, label+": Mbit/s", "%.1f", func(c cellResult) float64 { return c.MbitPerSec })
	add(true, label+": drops (% of sent)", "%.2f", func(c cellResult) float64 { return c.DropPercent })
	add(true, label+": latency p50 under load (ms)", "%.2f", func(c cellResult) float64 { return c.LatencyP50Ms })
	add(true, label+": latency p99 under load (ms)", "%.2f", func(c cellResult) float64 { return c.LatencyP99Ms })
	add(false, label+": latency p50, relay idle (ms)", "%.3f", func(c cellResult) float64 { return c.IdleLatencyP50Ms })
	add(false, label+": latency p99, relay idle (ms)", "%.3f", func(c cellResult) float64 { return c.IdleLatencyP99Ms })
	add(true, cpuFigure(shape), "%.2f", func(c cellResult) float64 { return c.CPUSecPerMpkt })
	add(true, label+": load generator CPU (share of its core)", "%.2f", func(c cellResult) float64 { return c.LoadgenCPU })
	add(true, label+": other processes' CPU (cores)", "%.2f", func(c cellResult) float64 { return c.OtherCPU })
	return out
}

func packetsFigure(shape cellShape) string { return shape.label() + ": delivered packets/s" }

func cpuFigure(shape cellShape) string {
	return shape.label() + ": relay CPU s per M packets (all its processes)"
}

// betweenCells is a figure computed from two cells of the same server.
func betweenCells(a, b cellShape, f func(a, b cellResult) float64) func(serverRun) (float64, bool) {
	return func(s serverRun) (float64, bool) {
		ca, okA := s.cell(a)
		cb, okB := s.cell(b)
		if !okA || !okB {
			return 0, false
		}
		v := f(ca, cb)
		return v, !math.IsNaN(v) && !math.IsInf(v, 0)
	}
}

// peersFigures: what the most peers keep of the fewest peers' packets/s
// (derper loses throughput as peers grow), and what each packet costs more.
func peersFigures(cfg config) []figure {
	if len(cfg.Peers) < 2 {
		return nil
	}
	few := cellShape{Size: cfg.PeersSize, Peers: cfg.Peers[0]}
	many := cellShape{Size: cfg.PeersSize, Peers: cfg.Peers[len(cfg.Peers)-1]}
	name := fmt.Sprintf("%s, %d peers / %d peers", sizeLabel(cfg.PeersSize), many.Peers, few.Peers)
	return []figure{
		{name + ": delivered packets/s", "%.2f", betweenCells(many, few, func(m, f cellResult) float64 { return m.PacketsPerSec / f.PacketsPerSec })},
		{name + ": CPU s per M packets", "%.2f", betweenCells(many, few, func(m, f cellResult) float64 { return m.CPUSecPerMpkt / f.CPUSecPerMpkt })},
	}
}

// sweepFigures: for every worker count above the sweep's first, the growth
// of packets/s measured here, and the growth a machine with that many cores
// free for the relay would show if each core did as much work as here:
// n/base times the CPU per packet at base over the CPU per packet at n (the
// cost of spreading a relay over cores, without the shared load generator).
func sweepFigures(cfg config) []figure {
	if len(cfg.SweepWorkers) < 2 {
		return nil
	}
	base := cellShape{Size: cfg.SweepSize, Workers: cfg.SweepWorkers[0]}
	var out []figure
	for _, n := range cfg.SweepWorkers[1:] {
		at := cellShape{Size: cfg.SweepSize, Workers: n}
		cores := float64(n) / float64(base.Workers)
		out = append(out,
			figure{growthFigure(cfg, n), "%.2f", betweenCells(at, base, func(a, b cellResult) float64 { return a.PacketsPerSec / b.PacketsPerSec })},
			figure{fmt.Sprintf("%s, %d cores / %d: projected growth with free cores (%.0f × CPU per packet at %d / at %d)",
				sizeLabel(cfg.SweepSize), n, base.Workers, cores, base.Workers, n), "%.2f",
				betweenCells(at, base, func(a, b cellResult) float64 { return cores * b.CPUSecPerMpkt / a.CPUSecPerMpkt })},
		)
	}
	return out
}

func growthFigure(cfg config, n int) string {
	return fmt.Sprintf("%s, %d cores / %d: delivered packets/s (measured growth)", sizeLabel(cfg.SweepSize), n, cfg.SweepWorkers[0])
}

// idleFigures: the relay's RSS (all its processes) at start and at each
// idle level, and the growth per connection from the start to each level.
func idleFigures(cfg config) []figure {
	if len(cfg.Idle) == 0 {
		return nil
	}
	rss := func(i int) func(serverRun) (float64, bool) {
		return func(s serverRun) (float64, bool) {
			if i >= len(s.Idle) {
				return 0, false
			}
			return float64(s.Idle[i].RSSBytes) / (1 << 20), true
		}
	}
	out := []figure{{"RSS at start (MiB)", "%.1f", rss(0)}}
	for i, n := range cfg.Idle {
		out = append(out, figure{fmt.Sprintf("RSS with %s idle connections (MiB)", countLabel(n)), "%.1f", rss(i + 1)})
	}
	for i, n := range cfg.Idle {
		out = append(out, figure{idleKiBFigure(n), "%.1f", func(s serverRun) (float64, bool) {
			if i+1 >= len(s.Idle) {
				return 0, false
			}
			return float64(s.Idle[i+1].RSSBytes-s.Idle[0].RSSBytes) / 1024 / float64(n), true
		}})
	}
	return out
}

func idleKiBFigure(n int) string {
	return fmt.Sprintf("KiB per idle connection at %s (RSS growth from start)", countLabel(n))
}

func sizeLabel(size int) string {
	if size >= 1024 && size%1024 == 0 {
		return fmt.Sprintf("%d KiB", size/1024)
	}
	return fmt.Sprintf("%d B", size)
}

func countLabel(n int) string {
	if n >= 1000 && n%1000 == 0 {
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

// ratio formats a/b, or a dash when it means nothing.
func ratio(a, b float64) string {
	if b == 0 || math.IsNaN(a/b) {
		return "—"
	}
	return fmt.Sprintf("%.2f", a/b)
}

// writeTable prints the markdown table of a against b (columns named by the kinds).
func writeTable(w io.Writer, cfg config, a, b serverRun, aName, bName string) {
	fmt.Fprintf(w, "| figure | %s | %s | %s / %s |\n", aName, bName, aName, bName)
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: |")
	for _, fig := range figures(cfg) {
		va, okA := fig.value(a)
		vb, okB := fig.value(b)
		if !okA || !okB {
			continue
		}
		fmt.Fprintf(w, "| %s | "+fig.format+" | "+fig.format+" | %s |\n", fig.name, va, vb, ratio(va, vb))
	}
}

func (r *results) writeJSON(path string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

func readResults(path string) (*results, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// writeMarkdown renders RESULTS.md: the machine, the table, our relay before
// and after (when a run measured derp-relay-before too), how to reproduce.
func (r *results) writeMarkdown(path string, notes string) error {
	var b strings.Builder
	fmt.Fprintln(&b, "# derp-relay vs. Tailscale's derper")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Generated by `bench/run` (`make bench`) from `bench/results.json`; do not edit by hand.")
	fmt.Fprintln(&b)
	r.Machine.writeMarkdown(&b)
	fmt.Fprintln(&b)
	c := r.Config
	fmt.Fprintln(&b, "## Goals (issue #11)")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Measured: derp-relay's figure over derper's in the same rounds, or derp-relay's own figure where the goal is absolute.")
	fmt.Fprintln(&b)
	writeGoals(&b, c, r.Median)
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "## Every figure")
	fmt.Fprintln(&b)
	fmt.Fprintf(&b, "Median of %d interleaved rounds per server (derp-relay, derper, derp-relay, …). "+
		"Each cell: %d derphttp sender→receiver pairs flood packets of one size for %g s "+
		"(after %g s warm-up) over TLS, while one more pair sends a timestamped probe every %v "+
		"for the latency figures. Relays pinned to CPU %s, the load generator to CPU %d.%s%s\n\n",
		c.Rounds, c.Pairs, c.DurationSec, c.WarmupSec, probeInterval, c.relayCPUs(), c.LoadCPU, c.workersNote(), c.dimensionsNote())
	writeTable(&b, c, r.Median[ours], r.Median[theirs], string(ours), string(theirs))
	if earlier, ok := r.Median[before]; ok {
		fmt.Fprintln(&b)
		fmt.Fprintln(&b, "## derp-relay before and after the optimisations")
		fmt.Fprintln(&b)
		fmt.Fprintf(&b, "Before: derp-relay at %s; after: at %s. Both in the same interleaved rounds "+
			"(derp-relay, derper, derp-relay-before, derp-relay, …), so machine drift falls on both.\n\n",
			r.Machine.BeforeCommit, r.Machine.Commit)
		writeTable(&b, c, r.Median[ours], earlier, "after", "before")
	}
	if notes != "" {
		fmt.Fprintln(&b)
		b.WriteString(strings.TrimSpace(notes))
		fmt.Fprintln(&b)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// relayCPUs is the relays' CPU list, also for results recorded before -relay-cpus.
func (c config) relayCPUs() string {
	if c.RelayCPUs != "" {
		return c.RelayCPUs
	}
	return strconv.Itoa(c.RelayCPU)
}

// dimensionsNote describes the peers cells, the workers sweep and the idle
// levels, when the run had them.
func (c config) dimensionsNote() string {
	var b strings.Builder
	if len(c.Peers) > 0 {
		fmt.Fprintf(&b, " Peers cells: %v clients at %s in a ring, each sending to the next, sharing the pairs' packets in flight.",
			c.Peers, sizeLabel(c.PeersSize))
	}
	if len(c.SweepWorkers) > 0 {
		fmt.Fprintf(&b, " Workers sweep: derp-relay --workers N and derper pinned to the first N CPUs, N in %v, at %s;"+
			" CPU and RSS are all of a relay's processes.", c.SweepWorkers, sizeLabel(c.SweepSize))
	}
	if len(c.Idle) > 0 && c.IdleRounds > 0 && c.IdleRounds < c.Rounds {
		fmt.Fprintf(&b, " Idle levels in the first %d round(s) only (the slowest part, and the steadiest figure).", c.IdleRounds)
	}
	if c.IdleAsked != nil {
		fmt.Fprintf(&b, " Idle levels %v were asked for; RLIMIT_NOFILE %d (not raisable here) allowed %v.",
			c.IdleAsked, c.NoFileLimit, c.Idle)
	}
	return b.String()
}

// workersNote says how many worker processes derp-relay ran, when told.
func (c config) workersNote() string {
	if c.RelayWorkers == 0 {
		return ""
	}
	return fmt.Sprintf(" derp-relay ran %d worker processes (--workers); its CPU and RSS are all of them together.", c.RelayWorkers)
}
