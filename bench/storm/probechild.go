package storm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"

	"tailscale.com/tailcfg"
)

// The innocent pairs run in a process of their own: in the storm's process
// their receiving goroutines would queue behind thousands of storm clients
// in Go's scheduler, and the figures would be the load generator's delay,
// not the relay's. The child is the same binary, told by its environment.
const (
	childRegionEnv = "DERPFLEET_STORM_PROBE_REGION" // the DERP region, JSON
	childPairsEnv  = "DERPFLEET_STORM_PROBE_PAIRS"
)

// childReport is what the child writes on stdout once its stdin closes.
type childReport struct {
	Lost    int64    `json:"lost"`
	Samples []Sample `json:"samples"`
	Error   string   `json:"error,omitempty"`
}

// RunProbeChildIfAsked is called first thing by a binary that may be a
// probe child (bench's main, the interop test's init): if this process is
// one, it runs the probes until its stdin closes, reports and exits.
func RunProbeChildIfAsked() {
	regionJSON := os.Getenv(childRegionEnv)
	if regionJSON == "" {
		return
	}
	out := json.NewEncoder(os.Stdout)
	report := func(r childReport) {
		out.Encode(r)
		os.Exit(0)
	}
	var region tailcfg.DERPRegion
	pairs, err := strconv.Atoi(os.Getenv(childPairsEnv))
	if err == nil {
		err = json.Unmarshal([]byte(regionJSON), &region)
	}
	if err != nil {
		report(childReport{Error: fmt.Sprintf("probe child: bad environment: %v", err)})
	}
	ps, err := StartProbes(context.Background(), &region, pairs)
	if err != nil {
		report(childReport{Error: err.Error()})
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	lost := ps.Finish()
	samples := ps.Samples()
	ps.Close()
	report(childReport{Lost: lost, Samples: samples})
}

// RemoteProbes are innocent pairs running in a child process.
type RemoteProbes struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// SpawnProbes starts self (this binary, with args that bring it to
// RunProbeChildIfAsked) as a probe child for pairs pairs on region and
// waits until they are connected.
func SpawnProbes(self string, args []string, region *tailcfg.DERPRegion, pairs int) (*RemoteProbes, error) {
	regionJSON, err := json.Marshal(region)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), childRegionEnv+"="+string(regionJSON), childPairsEnv+"="+strconv.Itoa(pairs))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	rp := &RemoteProbes{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	if line, err := rp.out.ReadString('\n'); line != "ready\n" {
		_, ferr := rp.finish(line)
		return nil, errors.Join(fmt.Errorf("probe child did not start: %v", err), ferr)
	}
	return rp, nil
}

// Finish stops the probes and returns every sample and the probes lost.
func (rp *RemoteProbes) Finish() (samples []Sample, lost int64, err error) {
	report, err := rp.finish("")
	return report.Samples, report.Lost, err
}

// finish closes the child's stdin and reads its report (head: what was
// already read of it).
func (rp *RemoteProbes) finish(head string) (childReport, error) {
	rp.stdin.Close()
	var report childReport
	rest, err := io.ReadAll(rp.out)
	werr := rp.cmd.Wait()
	data := append([]byte(head), rest...)
	if jerr := json.Unmarshal(data, &report); jerr != nil {
		return report, errors.Join(err, werr, fmt.Errorf("probe child said %q: %w", data, jerr))
	}
	if report.Error != "" {
		return report, errors.New(report.Error)
	}
	return report, errors.Join(err, werr)
}
