// Command bench measures derp-relay and Tailscale's derper side by side on
// loopback: the same derphttp clients, the same certificate and flags,
// interleaved rounds. bench/run builds it and derper; see bench/method.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	var (
		relayBin    = flag.String("relay", "derp-relay", "our relay's binary")
		derperBin   = flag.String("derper", os.Getenv("DERPER"), "Tailscale's derper binary")
		pairs       = flag.Int("pairs", 4, "sender→receiver client pairs per cell")
		window      = flag.Int("window", 32, "packets each pair may have in flight (0: flood without limit)")
		sizes       = flag.String("sizes", "64,570,1200,16384", "packet sizes in bytes, comma-separated (570: the mean DERP packet Tailscale reported)")
		peers       = flag.String("peers", "10,100", "client counts of the peers cells, each client sending to the next in a ring (empty: none)")
		peersSize   = flag.Int("peers-size", 1200, "packet size of the peers cells")
		sweep       = flag.String("sweep", "1,2,cores", "worker counts of the workers sweep: derp-relay --workers N and derper on the first N CPUs (empty: none)")
		sweepSize   = flag.Int("sweep-size", 1200, "packet size of the workers sweep")
		warmup      = flag.Duration("warmup", time.Second, "load before each measurement window")
		duration    = flag.Duration("duration", 5*time.Second, "measurement window per cell")
		rounds      = flag.Int("rounds", 3, "rounds per server (interleaved: ours, derper, ours, …)")
		idle        = flag.String("idle", "10000,50000", "idle connection counts for the RSS figures, lowered to what RLIMIT_NOFILE allows (empty: none)")
		idleRounds  = flag.Int("idle-rounds", 1, "how many of the first rounds measure the idle levels (minutes each at 50k)")
		relayCPU    = flag.Int("relay-cpu", 0, "CPU both relays are pinned to")
		relayCPUs   = flag.String("relay-cpus", "", "CPUs both relays are pinned to, a taskset list such as 0,1 (overrides -relay-cpu)")
		workers     = flag.Int("relay-workers", 0, "derp-relay's --workers (0: its default, one per CPU it is pinned to)")
		loadCPU     = flag.Int("load-cpu", 1, "CPU this load generator runs on (bench/run pins it; recorded only)")
		jsonOut     = flag.String("json", "", "write the results here")
		markdownOut = flag.String("markdown", "", "render the results as markdown here (RESULTS.md)")
		relayBefore = flag.String("relay-before", "", "a checkout of derp-relay's source to measure too, as derp-relay-before, in the same rounds")
		notes       = flag.String("notes", "", "markdown appended to the rendered results (method, reproduction)")
		render      = flag.String("render", "", "render -markdown from this results JSON without measuring")
		profileDir  = flag.String("profile", "", "record a py-spy profile of derp-relay per cell of round 1 here")
		profileFmt  = flag.String("profile-format", "flamegraph", "py-spy output format: flamegraph, raw, speedscope")
		smoke       = flag.Bool("smoke", false, "fail unless every cell delivered packets (for make test)")
	)
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix(">> ")

	if *render != "" {
		r, err := readResults(*render)
		if err != nil {
			log.Fatal(err)
		}
		if err := renderMarkdown(r, *markdownOut, *notes); err != nil {
			log.Fatal(err)
		}
		return
	}

	cfg := config{
		Pairs: *pairs, Window: *window, WarmupSec: warmup.Seconds(), DurationSec: duration.Seconds(),
		Rounds: *rounds, RelayCPU: *relayCPU, RelayCPUs: *relayCPUs, RelayWorkers: *workers, LoadCPU: *loadCPU,
		PeersSize: *peersSize, SweepSize: *sweepSize, IdleRounds: min(*idleRounds, *rounds),
	}
	if cfg.RelayCPUs == "" {
		cfg.RelayCPUs = strconv.Itoa(cfg.RelayCPU)
	}
	var idleLevels []int
	var err1, err2, err3, err4 error
	cfg.Sizes, err1 = parseInts(*sizes)
	idleLevels, err2 = parseInts(*idle)
	cfg.Peers, err3 = parseInts(*peers)
	cfg.SweepWorkers, err4 = parseWorkers(*sweep, machineCores())
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		log.Fatal(err)
	}
	slices.Sort(cfg.Peers)
	slices.Sort(idleLevels)
	limit, err := raiseNoFileLimit()
	if err != nil {
		log.Fatal(err)
	}
	if cfg.Idle, cfg.IdleAsked = fitIdleLevels(idleLevels, limit); cfg.IdleAsked != nil {
		cfg.NoFileLimit = limit
		log.Printf("RLIMIT_NOFILE is %d (raising it needs CAP_SYS_RESOURCE): idle levels %v measured as %v", limit, cfg.IdleAsked, cfg.Idle)
	}
	if *derperBin == "" {
		log.Fatal("no derper binary: pass -derper or set DERPER (bench/run builds one)")
	}
	specs := []serverSpec{
		{kind: ours, binary: *relayBin, cpus: cfg.RelayCPUs, workers: cfg.RelayWorkers},
		{kind: theirs, binary: *derperBin, cpus: cfg.RelayCPUs},
	}
	beforeCommit := ""
	if *relayBefore != "" {
		source, err := filepath.Abs(filepath.Join(*relayBefore, "relay"))
		if err == nil {
			_, err = os.Stat(filepath.Join(source, "derprelay", "server.py"))
		}
		if err != nil {
			log.Fatalf("-relay-before %s: not a derpfleet checkout: %v", *relayBefore, err)
		}
		beforeCommit = strings.TrimSpace(output("git", "-C", *relayBefore, "rev-parse", "--short", "HEAD"))
		specs = append(specs, serverSpec{kind: before, binary: *relayBin, cpus: cfg.RelayCPUs, env: []string{"PYTHONPATH=" + source}})
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *stormMode {
		if err := runStorm(ctx, cfg, specs, beforeCommit, *jsonOut, *markdownOut); err != nil {
			log.Fatal(err)
		}
		return
	}
	r, err := measure(ctx, cfg, specs, *profileDir, *profileFmt)
	if err != nil {
		log.Fatal(err)
	}
	r.Machine.BeforeCommit = beforeCommit
	fmt.Println()
	r.Machine.writeMarkdown(os.Stdout)
	fmt.Println()
	writeTable(os.Stdout, cfg, r.Median[ours], r.Median[theirs], string(ours), string(theirs))
	fmt.Println()
	writeGoals(os.Stdout, cfg, r.Median)
	if _, ok := r.Median[before]; ok {
		fmt.Println()
		writeTable(os.Stdout, cfg, r.Median[ours], r.Median[before], "after", "before")
	}
	if *jsonOut != "" {
		if err := r.writeJSON(*jsonOut); err != nil {
			log.Fatal(err)
		}
		log.Printf("results in %s", *jsonOut)
	}
	if *markdownOut != "" {
		if err := renderMarkdown(r, *markdownOut, *notes); err != nil {
			log.Fatal(err)
		}
	}
	if *smoke {
		if err := checkDelivered(r); err != nil {
			log.Fatal(err)
		}
		log.Print("smoke run: every cell delivered packets")
	}
}

// measure runs the interleaved rounds and returns every figure.
func measure(ctx context.Context, cfg config, specs []serverSpec, profileDir, profileFmt string) (*results, error) {
	cert, err := newBenchCert()
	if err != nil {
		return nil, err
	}
	r := &results{
		Machine: describeMachine(specs[0].binary, specs[1].binary),
		Config:  cfg,
	}
	log.Printf("%s; %d cores; %s", r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel)
	log.Printf("relays on CPUs %s (derp-relay --workers %d), load generator on CPU %d; %d round(s) each, %d pairs, sizes %v, peers %v, workers sweep %v, %v per cell",
		cfg.RelayCPUs, cfg.RelayWorkers, cfg.LoadCPU, cfg.Rounds, cfg.Pairs, cfg.Sizes, cfg.Peers, cfg.SweepWorkers,
		time.Duration(cfg.DurationSec*float64(time.Second)))
	for round := 1; round <= cfg.Rounds; round++ {
		for _, spec := range specs {
			prefix := fmt.Sprintf("[round %d/%d] %-10s", round, cfg.Rounds, spec.kind)
			profile := ""
			if round == 1 && spec.kind == ours {
				profile = profileDir
			}
			run, err := measureServer(ctx, cfg, spec, cert, round <= cfg.IdleRounds, profile, profileFmt, prefix)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", prefix, err)
			}
			run.Round = round
			r.Runs = append(r.Runs, run)
		}
	}
	r.summarise()
	return r, nil
}

// measureServer is one round of one server: the idle levels (withIdle), the
// cells on the run's relay CPUs (profiled when profileDir is set), then the
// workers sweep, each on a fresh relay.
func measureServer(ctx context.Context, cfg config, spec serverSpec, cert *benchCert, withIdle bool, profileDir, profileFmt, prefix string) (serverRun, error) {
	run := serverRun{Server: spec.kind}
	var err error
	if withIdle && len(cfg.Idle) > 0 {
		if run.Idle, err = idleRound(ctx, spec, cert, cfg.Idle); err != nil {
			return run, fmt.Errorf("idle: %w", err)
		}
		for _, m := range run.Idle {
			log.Printf("%s RSS with %5d idle connections: %6.1f MiB", prefix, m.Conns, float64(m.RSSBytes)/(1<<20))
		}
	}
	if run.Cells, err = loadRound(ctx, spec, cert, cfg, cfg.mainShapes(), profileDir, profileFmt, prefix); err != nil {
		return run, err
	}
	for _, shape := range cfg.sweepShapes() {
		cells, err := loadRound(ctx, spec.onCores(shape.Workers), cert, cfg, []cellShape{shape}, "", "", prefix)
		if err != nil {
			return run, err
		}
		run.Cells = append(run.Cells, cells...)
	}
	return run, nil
}

// idleRound starts a fresh relay and measures its RSS with each number of
// idle connections (ascending).
func idleRound(ctx context.Context, spec serverSpec, cert *benchCert, levels []int) ([]idleResult, error) {
	srv, dir, err := freshServer(ctx, spec, cert)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	defer srv.stop()
	return measureIdle(ctx, srv, cert, levels)
}

// loadRound starts a fresh relay and measures one cell per shape.
func loadRound(ctx context.Context, spec serverSpec, cert *benchCert, cfg config, shapes []cellShape, profileDir, profileFmt, prefix string) ([]cellResult, error) {
	srv, dir, err := freshServer(ctx, spec, cert)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	defer srv.stop()
	var cells []cellResult
	window := time.Duration(cfg.DurationSec * float64(time.Second))
	for _, shape := range shapes {
		p := loadParams{shape: shape, pairs: cfg.Pairs, window: cfg.Window, warmup: time.Duration(cfg.WarmupSec * float64(time.Second)), duration: window}
		var profiler *exec.Cmd
		if profileDir != "" {
			if profiler, err = startProfiler(srv, profileDir, profileFmt, shape, p.warmup+window); err != nil {
				return nil, err
			}
		}
		cell, err := runCell(ctx, srv, cert, p)
		if profiler != nil {
			if werr := profiler.Wait(); werr != nil {
				log.Printf("%s py-spy: %v", prefix, werr)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", shape.label(), err)
		}
		log.Printf("%s %-7s %8.0f pkt/s %8.1f Mbit/s  drops %5.2f%%  p50/p99 %.2f/%.2f ms (idle %.3f/%.3f)  %.2f CPU s/Mpkt of %d process(es)  (load generator %.0f%%, others %.0f%% CPU)",
			prefix, shape.label(), cell.PacketsPerSec, cell.MbitPerSec, cell.DropPercent,
			cell.LatencyP50Ms, cell.LatencyP99Ms, cell.IdleLatencyP50Ms, cell.IdleLatencyP99Ms,
			cell.CPUSecPerMpkt, cell.Processes, 100*cell.LoadgenCPU, 100*cell.OtherCPU)
		cells = append(cells, cell)
	}
	return cells, nil
}

func freshServer(ctx context.Context, spec serverSpec, cert *benchCert) (*server, string, error) {
	dir, err := os.MkdirTemp("", "derpfleet-bench-")
	if err != nil {
		return nil, "", err
	}
	srv, err := startServer(ctx, spec, cert, dir)
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	return srv, dir, nil
}

// startProfiler samples derp-relay with py-spy for the length of one cell.
func startProfiler(srv *server, dir, format string, shape cellShape, length time.Duration) (*exec.Cmd, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ext := map[string]string{"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[format]
	if ext == "" {
		return nil, fmt.Errorf("unknown py-spy format %q", format)
	}
	name := strconv.Itoa(shape.Size)
	if shape.Peers > 0 {
		name += fmt.Sprintf("-%dpeers", shape.Peers)
	}
	out := filepath.Join(dir, fmt.Sprintf("derp-relay-%s.%s", name, ext))
	cmd := exec.Command("py-spy", "record", "--nonblocking", "--format", format, "-o", out,
		"--pid", strconv.Itoa(srv.cmd.Process.Pid), "--duration", strconv.Itoa(int(length.Seconds()+0.5)))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	log.Printf("profiling derp-relay into %s", out)
	return cmd, cmd.Start()
}

// checkDelivered is the smoke run's only assertion: packets went through.
func checkDelivered(r *results) error {
	var errs []error
	for _, run := range r.Runs {
		for _, cell := range run.Cells {
			if cell.Received == 0 || cell.PacketsPerSec == 0 {
				errs = append(errs, fmt.Errorf("%s round %d: no packets delivered in the cell %s", run.Server, run.Round, cell.label()))
			}
		}
	}
	return errors.Join(errs...)
}

func renderMarkdown(r *results, path, notesPath string) error {
	if path == "" {
		return errors.New("no -markdown path to render to")
	}
	var notes []byte
	if notesPath != "" {
		var err error
		if notes, err = os.ReadFile(notesPath); err != nil {
			return err
		}
	}
	if err := r.writeMarkdown(path, string(notes)); err != nil {
		return err
	}
	log.Printf("rendered %s", path)
	return nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for field := range strings.SplitSeq(s, ",") {
		if field = strings.TrimSpace(field); field == "" {
			continue
		}
		n, err := strconv.Atoi(field)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad number %q in a list", field)
		}
		out = append(out, n)
	}
	return out, nil
}
