package main

import (
	"slices"
	"strings"
	"testing"
)

// testConfig has one cell of every kind: a size, two peers cells, a sweep.
func testConfig() config {
	return config{
		Pairs: 4, Sizes: []int{64, 1200}, Rounds: 2, RelayCPUs: "0",
		Peers: []int{10, 100}, PeersSize: 1200, SweepWorkers: []int{1, 2}, SweepSize: 1200,
		Idle: []int{10000},
	}
}

// testRun is one server's figures: packets/s and CPU per M packets for
// every cell of testConfig, RSS 40 MiB at start plus perConnKiB per idle
// connection.
func testRun(kind serverKind, pps, cpu map[cellShape]float64, perConnKiB int64) serverRun {
	run := serverRun{Server: kind}
	for _, shape := range testConfig().shapes() {
		run.Cells = append(run.Cells, cellResult{cellShape: shape, PacketsPerSec: pps[shape], CPUSecPerMpkt: cpu[shape], Received: 1})
	}
	run.Idle = []idleResult{{Conns: 0, RSSBytes: 40 << 20}, {Conns: 10000, RSSBytes: 40<<20 + 10000*perConnKiB<<10}}
	return run
}

func TestShapesOrderAndLabels(t *testing.T) {
	var labels []string
	for _, s := range testConfig().shapes() {
		labels = append(labels, s.label())
	}
	want := []string{"64 B", "1200 B", "1200 B, 10 peers", "1200 B, 100 peers",
		"1200 B, CPUs 0 (--workers 1)", "1200 B, CPUs 0-1 (--workers 2)"}
	if !slices.Equal(labels, want) {
		t.Fatalf("labels %q, want %q", labels, want)
	}
}

func TestTopology(t *testing.T) {
	n, flows := loadParams{shape: cellShape{Size: 64}, pairs: 2}.topology()
	if n != 4 || !slices.Equal(flows, []flow{{0, 1}, {2, 3}}) {
		t.Errorf("pairs: %d clients, flows %v", n, flows)
	}
	n, flows = loadParams{shape: cellShape{Size: 64, Peers: 3}, pairs: 2}.topology()
	if n != 3 || !slices.Equal(flows, []flow{{0, 1}, {1, 2}, {2, 0}}) {
		t.Errorf("ring: %d clients, flows %v", n, flows)
	}
}

func TestFlowWindow(t *testing.T) {
	for _, tc := range []struct{ peers, window, want int }{
		{0, 32, 32}, {10, 32, 13}, {100, 32, 1}, {300, 32, 1}, {100, 0, 0},
	} {
		p := loadParams{shape: cellShape{Size: 64, Peers: tc.peers}, pairs: 4, window: tc.window}
		if got := p.flowWindow(); got != tc.want {
			t.Errorf("%d peers, window %d for 4 pairs: %d each, want %d", tc.peers, tc.window, got, tc.want)
		}
	}
}

func TestParseWorkers(t *testing.T) {
	got, err := parseWorkers("cores, 1,2", 2)
	if err != nil || !slices.Equal(got, []int{1, 2}) {
		t.Errorf("1,2,cores on 2 cores: %v, %v", got, err)
	}
	got, err = parseWorkers("", 2)
	if err != nil || got != nil {
		t.Errorf("empty: %v, %v", got, err)
	}
	for _, bad := range []string{"3", "0", "x"} {
		if _, err := parseWorkers(bad, 2); err == nil {
			t.Errorf("%q on 2 cores: no error", bad)
		}
	}
}

func TestFitIdleLevels(t *testing.T) {
	fitted, asked := fitIdleLevels([]int{10000, 50000}, 20000)
	if !slices.Equal(fitted, []int{10000, 19000}) || !slices.Equal(asked, []int{10000, 50000}) {
		t.Errorf("limit 20000: %v (asked %v)", fitted, asked)
	}
	fitted, asked = fitIdleLevels([]int{10000, 50000}, 1<<20)
	if !slices.Equal(fitted, []int{10000, 50000}) || asked != nil {
		t.Errorf("limit 1M: %v (asked %v)", fitted, asked)
	}
	fitted, _ = fitIdleLevels([]int{19500, 20000}, 20000)
	if !slices.Equal(fitted, []int{19000}) {
		t.Errorf("two levels above the limit: %v, want one", fitted)
	}
}

func TestSummariseTakesMedianPerShape(t *testing.T) {
	cfg := testConfig()
	peers := cellShape{Size: 1200, Peers: 100}
	r := &results{Config: cfg}
	for i, pps := range []float64{100, 300, 200} {
		run := testRun(ours, map[cellShape]float64{peers: pps}, nil, int64(30+i))
		if i > 0 { // idle levels in the first round only (-idle-rounds 1)
			run.Idle = nil
		}
		r.Runs = append(r.Runs, run)
	}
	r.summarise()
	m := r.Median[ours]
	if c, ok := m.cell(peers); !ok || c.PacketsPerSec != 200 {
		t.Errorf("median of the 100 peers cell: %v (found %v), want 200", c.PacketsPerSec, ok)
	}
	if len(m.Idle) != 2 || m.Idle[1].RSSBytes != 40<<20+10000*30<<10 {
		t.Errorf("idle median of the one round that measured it: %+v", m.Idle)
	}
}

func TestDerivedFigures(t *testing.T) {
	cfg := testConfig()
	one, two := cellShape{Size: 1200, Workers: 1}, cellShape{Size: 1200, Workers: 2}
	few, many := cellShape{Size: 1200, Peers: 10}, cellShape{Size: 1200, Peers: 100}
	run := testRun(ours,
		map[cellShape]float64{one: 1000, two: 1500, few: 800, many: 600},
		map[cellShape]float64{one: 10, two: 12.5, few: 10, many: 11}, 34)
	want := map[string]float64{
		growthFigure(cfg, 2): 1.5,
		"1200 B, 2 cores / 1: projected growth with free cores (2 × CPU per packet at 1 / at 2)": 1.6,
		"1200 B, 100 peers / 10 peers: delivered packets/s":                                      0.75,
		"1200 B, 100 peers / 10 peers: CPU s per M packets":                                      1.1,
		idleKiBFigure(10000): 34,
	}
	for _, fig := range figures(cfg) {
		w, ok := want[fig.name]
		if !ok {
			continue
		}
		delete(want, fig.name)
		if v, ok := fig.value(run); !ok || v < w-1e-9 || v > w+1e-9 {
			t.Errorf("%s: %v (%v), want %v", fig.name, v, ok, w)
		}
	}
	for name := range want {
		t.Errorf("no figure %q", name)
	}
}

func TestGoalVerdicts(t *testing.T) {
	for _, tc := range []struct {
		g    goal
		v    float64
		want string
	}{
		{goal{cmp: atMost, target: 1}, 1.77, "not reached (77% over)"},
		{goal{cmp: atMost, target: 1}, 0.95, "reached (5% under)"},
		{goal{cmp: atLeast, target: 1}, 0.72, "not reached (28% short)"},
		{goal{cmp: atLeast, target: 1}, 1.0, "reached (0% over)"},
		{goal{cmp: above, target: 1}, 1.0, "not reached (0% short)"},
		{goal{cmp: above, target: 1}, 1.3, "reached (30% over)"},
		{goal{cmp: atMost, target: 15, unit: "KiB"}, 34, "not reached (127% over)"},
	} {
		if got := tc.g.verdict(tc.v); got != tc.want {
			t.Errorf("%v against %+v: %q, want %q", tc.v, tc.g, got, tc.want)
		}
	}
}

func TestGoalsTable(t *testing.T) {
	cfg := testConfig()
	one, two := cellShape{Size: 1200, Workers: 1}, cellShape{Size: 1200, Workers: 2}
	main := cellShape{Size: 1200}
	median := map[serverKind]serverRun{
		ours:   testRun(ours, map[cellShape]float64{main: 80, one: 80, two: 120}, map[cellShape]float64{{Size: 64}: 12, main: 8}, 34),
		theirs: testRun(theirs, map[cellShape]float64{main: 100, one: 100, two: 110}, map[cellShape]float64{{Size: 64}: 6, main: 8}, 65),
	}
	var b strings.Builder
	writeGoals(&b, cfg, median)
	table := b.String()
	for _, row := range []string{
		"| CPU s per M packets at 64 B ≤ 1.0× derper | 12.00 | 6.00 | 2.00× | ≤ 1.00× | not reached (100% over) |",
		"| CPU s per M packets at 1200 B ≤ 1.0× derper | 8.00 | 8.00 | 1.00× | ≤ 1.00× | reached (0% under) |",
		"| delivered packets/s at 1200 B ≥ 1.0× derper, same cores (CPUs 0) | 80 | 100 | 0.80× | ≥ 1.00× | not reached (20% short) |",
		"| delivered packets/s at 1200 B ≥ 1.0× derper, same cores (CPUs 0-1) | 120 | 110 | 1.09× | ≥ 1.00× | reached (9% over) |",
		"| handshakes/s ≥ 1.0× derper | — | — | — | ≥ 1.00× | not measured in this run: the handshake storm, `-storm` (bench/storm.go) |",
		"| RSS per idle connection at 10k ≤ 15 KiB | 34.0 | 65.0 | 34.0 KiB | ≤ 15.0 KiB | not reached (127% over) |",
		"| throughput grows with N: packets/s with 2 cores / 1 (measured factor) | 1.50 | 1.10 | 1.50× | > 1.00× | reached (50% over) |",
	} {
		if !strings.Contains(table, row+"\n") {
			t.Errorf("no row\n%s\nin\n%s", row, table)
		}
	}
	if strings.Count(table, "same cores (CPUs 0)") != 1 {
		t.Errorf("the sweep's one core and the size cell both judged:\n%s", table)
	}
	if strings.Contains(table, "570 B") || strings.Contains(table, "16 KiB") {
		t.Errorf("goals for sizes the run did not measure:\n%s", table)
	}
}
