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
	RelayCPU    int     `json:"relayCpu"`
	// RelayCPUs and RelayWorkers: where relays ran and derp-relay's --workers (0: its default).
	RelayCPUs    string `json:"relayCpus,omitempty"`
	RelayWorkers int    `json:"relayWorkers,omitempty"`
	LoadCPU      int    `json:"loadCpu"`
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
				Size:             cell.Size,
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
			})
		}
		for i, idle := range runs[0].Idle {
			rss := medianOf(runs, func(run serverRun) float64 { return float64(run.Idle[i].RSSBytes) })
			m.Idle = append(m.Idle, idleResult{Conns: idle.Conns, RSSBytes: int64(rss)})
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

// figures lists the rows for the sizes and idle levels of a run.
func figures(cfg config) []figure {
	var out []figure
	for i, size := range cfg.Sizes {
		cell := func(f func(cellResult) float64) func(serverRun) (float64, bool) {
			return func(s serverRun) (float64, bool) {
				if i >= len(s.Cells) || s.Cells[i].Size != size {
					return 0, false
				}
				return f(s.Cells[i]), true
			}
		}
		label := sizeLabel(size)
		out = append(out,
			figure{label + ": delivered packets/s", "%.0f", cell(func(c cellResult) float64 { return c.PacketsPerSec })},
			figure{label + ": Mbit/s", "%.1f", cell(func(c cellResult) float64 { return c.MbitPerSec })},
			figure{label + ": drops (% of sent)", "%.2f", cell(func(c cellResult) float64 { return c.DropPercent })},
			figure{label + ": latency p50 under load (ms)", "%.2f", cell(func(c cellResult) float64 { return c.LatencyP50Ms })},
			figure{label + ": latency p99 under load (ms)", "%.2f", cell(func(c cellResult) float64 { return c.LatencyP99Ms })},
			figure{label + ": latency p50, relay idle (ms)", "%.3f", cell(func(c cellResult) float64 { return c.IdleLatencyP50Ms })},
			figure{label + ": latency p99, relay idle (ms)", "%.3f", cell(func(c cellResult) float64 { return c.IdleLatencyP99Ms })},
			figure{label + ": relay CPU s per M packets", "%.2f", cell(func(c cellResult) float64 { return c.CPUSecPerMpkt })},
			figure{label + ": load generator CPU (share of its core)", "%.2f", cell(func(c cellResult) float64 { return c.LoadgenCPU })},
			figure{label + ": other processes' CPU (cores)", "%.2f", cell(func(c cellResult) float64 { return c.OtherCPU })},
		)
	}
	idleRSS := func(i int) func(serverRun) (float64, bool) {
		return func(s serverRun) (float64, bool) {
			if i >= len(s.Idle) {
				return 0, false
			}
			return float64(s.Idle[i].RSSBytes) / (1 << 20), true
		}
	}
	if len(cfg.Idle) > 0 {
		out = append(out, figure{"RSS at start (MiB)", "%.1f", idleRSS(0)})
	}
	for i, n := range cfg.Idle {
		out = append(out, figure{fmt.Sprintf("RSS with %s idle connections (MiB)", countLabel(n)), "%.1f", idleRSS(i + 1)})
	}
	if n := len(cfg.Idle); n > 0 {
		last := cfg.Idle[n-1]
		out = append(out, figure{
			fmt.Sprintf("KiB per idle connection (RSS growth to %s)", countLabel(last)), "%.1f",
			func(s serverRun) (float64, bool) {
				if len(s.Idle) <= n {
					return 0, false
				}
				return float64(s.Idle[n].RSSBytes-s.Idle[0].RSSBytes) / 1024 / float64(last), true
			},
		})
	}
	return out
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
	fmt.Fprintf(&b, "Median of %d interleaved rounds per server (derp-relay, derper, derp-relay, …). "+
		"Each cell: %d derphttp sender→receiver pairs flood packets of one size for %.0f s "+
		"(after %.0f s warm-up) over TLS, while one more pair sends a timestamped probe every %v "+
		"for the latency figures. Relays pinned to CPU %s, the load generator to CPU %d.%s\n\n",
		c.Rounds, c.Pairs, c.DurationSec, c.WarmupSec, probeInterval, c.relayCPUs(), c.LoadCPU, c.workersNote())
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

// workersNote says how many worker processes derp-relay ran, when told.
func (c config) workersNote() string {
	if c.RelayWorkers == 0 {
		return ""
	}
	return fmt.Sprintf(" derp-relay ran %d worker processes (--workers); its CPU and RSS are all of them together.", c.RelayWorkers)
}
