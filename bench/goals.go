package main

// The goals of issue #11, judged in RESULTS.md from the figures of the run
// itself (derper in the same interleaved rounds), never in a timed test.

import (
	"fmt"
	"io"
	"math"
	"slices"
)

// comparison is how a goal's measured value must stand to its target.
type comparison int

const (
	atMost comparison = iota
	atLeast
	above
)

// goal is one goal of the issue: the figure it reads and what it must be.
type goal struct {
	name   string
	figure string // the name of a figures() row
	// ofDerper: the measured value is derp-relay's figure over derper's;
	// otherwise derp-relay's figure itself, in unit.
	ofDerper bool
	cmp      comparison
	target   float64
	unit     string
	// elsewhere says where a figure this run does not have is measured.
	elsewhere string
}

// handshakesFigure is the row the handshake storm (bench/storm.go, -storm)
// reports completed handshakes per second in; the goal is judged when the
// run's figures have it.
const handshakesFigure = "handshakes/s completed during the storm"

// goalSizes are the packet sizes the CPU goal names.
var goalSizes = []int{64, 570, 1200, 16384}

// idleGoalKiB is the most RSS an idle connection may cost (Tailscale's newest
// derper reports 14.5 KB per idle TLS connection at 100k connections).
const idleGoalKiB = 15

// throughputGoalSize is the packet size of the throughput goal.
const throughputGoalSize = 1200

// goals lists the goals the run's figures can judge, in the order.
func goals(cfg config) []goal {
	var out []goal
	for _, size := range goalSizes {
		if slices.Contains(cfg.Sizes, size) {
			out = append(out, goal{
				name:   fmt.Sprintf("CPU s per M packets at %s ≤ 1.0× derper", sizeLabel(size)),
				figure: cpuFigure(cellShape{Size: size}), ofDerper: true, cmp: atMost, target: 1,
			})
		}
	}
	throughput := func(shape cellShape, cpus string) goal {
		return goal{
			name:   fmt.Sprintf("delivered packets/s at %s ≥ 1.0× derper, same cores (CPUs %s)", sizeLabel(shape.Size), cpus),
			figure: packetsFigure(shape), ofDerper: true, cmp: atLeast, target: 1,
		}
	}
	// One row per core count: the sweep's cells, else the size cell.
	if cfg.SweepSize == throughputGoalSize && len(cfg.SweepWorkers) > 0 {
		for _, shape := range cfg.sweepShapes() {
			out = append(out, throughput(shape, sweepCPUs(shape.Workers)))
		}
	} else if slices.Contains(cfg.Sizes, throughputGoalSize) {
		out = append(out, throughput(cellShape{Size: throughputGoalSize}, cfg.relayCPUs()))
	}
	out = append(out, goal{
		name: "handshakes/s ≥ 1.0× derper", figure: handshakesFigure, ofDerper: true, cmp: atLeast, target: 1,
		elsewhere: "the handshake storm, `-storm` (bench/storm.go)",
	})
	for _, n := range cfg.Idle {
		out = append(out, goal{
			name:   fmt.Sprintf("RSS per idle connection at %s ≤ %d KiB", countLabel(n), idleGoalKiB),
			figure: idleKiBFigure(n), cmp: atMost, target: idleGoalKiB, unit: "KiB",
		})
	}
	for _, n := range cfg.SweepWorkers[min(1, len(cfg.SweepWorkers)):] {
		out = append(out, goal{
			name:   fmt.Sprintf("throughput grows with N: packets/s with %d cores / %d (measured factor)", n, cfg.SweepWorkers[0]),
			figure: growthFigure(cfg, n), cmp: above, target: 1,
		})
	}
	return out
}

// measured is the goal's value for one server: its figure over derper's, or
// the figure itself.
func (g goal) measured(fig figure, run, derper serverRun) (float64, bool) {
	v, ok := fig.value(run)
	if !ok || !g.ofDerper {
		return v, ok
	}
	d, ok := fig.value(derper)
	if !ok || d == 0 {
		return 0, false
	}
	return v / d, true
}

// format prints a measured value: a ratio to derper, or a value in its unit.
func (g goal) format(v float64) string {
	if g.ofDerper || g.unit == "" {
		return fmt.Sprintf("%.2f×", v)
	}
	return fmt.Sprintf("%.1f %s", v, g.unit)
}

// targetText is the goal's target as the table prints it.
func (g goal) targetText() string {
	return map[comparison]string{atMost: "≤ ", atLeast: "≥ ", above: "> "}[g.cmp] + g.format(g.target)
}

// verdict says whether v reaches the goal, and by how much it passes or
// misses it, as a share of the target.
func (g goal) verdict(v float64) string {
	off := 100 * (v/g.target - 1)
	by := math.Abs(off)
	switch {
	case g.cmp == atMost && off <= 0:
		return fmt.Sprintf("reached (%.0f%% under)", by)
	case g.cmp == atMost:
		return fmt.Sprintf("not reached (%.0f%% over)", by)
	case g.cmp == atLeast && off >= 0, g.cmp == above && off > 0:
		return fmt.Sprintf("reached (%.0f%% over)", by)
	default:
		return fmt.Sprintf("not reached (%.0f%% short)", by)
	}
}

// writeGoals prints the goals table: derp-relay's and derper's figures, the
// measured value, the target and the verdict; with a before run, before's
// measured value too.
func writeGoals(w io.Writer, cfg config, median map[serverKind]serverRun) {
	byName := map[string]figure{}
	for _, fig := range figures(cfg) {
		byName[fig.name] = fig
	}
	earlier, withBefore := median[before]
	fmt.Fprint(w, "| goal | derp-relay | derper | measured | target | verdict |")
	if withBefore {
		fmt.Fprint(w, " before |")
	}
	fmt.Fprint(w, "\n| --- | ---: | ---: | ---: | ---: | --- |")
	if withBefore {
		fmt.Fprint(w, " ---: |")
	}
	fmt.Fprintln(w)
	for _, g := range goals(cfg) {
		fig, known := byName[g.figure]
		var v float64
		if known {
			v, known = g.measured(fig, median[ours], median[theirs])
		}
		if !known {
			where := ""
			if g.elsewhere != "" {
				where = ": " + g.elsewhere
			}
			fmt.Fprintf(w, "| %s | — | — | — | %s | not measured in this run%s |", g.name, g.targetText(), where)
			if withBefore {
				fmt.Fprint(w, " — |")
			}
			fmt.Fprintln(w)
			continue
		}
		a, _ := fig.value(median[ours])
		b, okB := fig.value(median[theirs])
		derper := "—"
		if okB {
			derper = fmt.Sprintf(fig.format, b)
		}
		fmt.Fprintf(w, "| %s | "+fig.format+" | %s | %s | %s | %s |", g.name, a, derper, g.format(v), g.targetText(), g.verdict(v))
		if withBefore {
			if e, ok := g.measured(fig, earlier, median[theirs]); ok {
				fmt.Fprintf(w, " %s |", g.format(e))
			} else {
				fmt.Fprint(w, " — |")
			}
		}
		fmt.Fprintln(w)
	}
}
