package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// serverKind names one of the relays compared.
type serverKind string

const (
	ours   serverKind = "derp-relay"
	theirs serverKind = "derper"
	// before is derp-relay from another checkout (-relay-before), measured in
	// the same interleaved rounds: a machine whose speed drifts between runs
	// (seen here: 25% from one run to the next) cannot compare two runs.
	before serverKind = "derp-relay-before"
)

// serverKinds is every kind, in the order rounds run them.
var serverKinds = []serverKind{ours, theirs, before}

// serverStartTimeout bounds how long a relay may take to answer /derp/probe.
const serverStartTimeout = 30 * time.Second

// clockTicksPerSecond is USER_HZ, the unit of utime/stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicksPerSecond = 100

// serverSpec says how to start one kind of relay.
type serverSpec struct {
	kind    serverKind
	binary  string
	cpus    string   // the CPUs the relay is pinned to (a taskset list)
	workers int      // derp-relay's --workers (0: its default)
	env     []string // added to the environment (PYTHONPATH for the before checkout)
}

// onCores is the spec pinned to the first n CPUs, derp-relay with n workers
// (derper has no such flag: its GOMAXPROCS follows the CPUs it may use).
func (s serverSpec) onCores(n int) serverSpec {
	s.cpus, s.workers = sweepCPUs(n), n
	return s
}

// args are the flags of one relay: the same listener, TLS certificate and
// key file, no STUN, no mesh, no HTTP port, default queue depth and write
// timeout, spelled as each binary spells them.
func (s serverSpec) args(port int, dir string) []string {
	addr := net.JoinHostPort(benchHost, strconv.Itoa(port))
	cfg := filepath.Join(dir, "derp-key.json")
	switch s.kind {
	case theirs:
		return []string{
			"-a", addr, "-http-port=-1", "-stun=false",
			"-certmode", "manual", "-certdir", dir, "-hostname", benchHost,
			"-c", cfg, "-home", "blank",
		}
	default:
		args := []string{
			"-a", addr, "--no-stun",
			"--certmode", "manual", "--certdir", dir, "--hostname", benchHost,
			"-c", cfg, "--log-level", "warning",
		}
		if s.workers > 0 {
			args = append(args, "--workers", strconv.Itoa(s.workers))
		}
		return args
	}
}

// server is one running relay process.
type server struct {
	spec   serverSpec
	port   int
	cmd    *exec.Cmd
	logs   *bytes.Buffer
	exited chan struct{}
}

// startServer starts a relay pinned to its CPU and waits until it answers.
func startServer(ctx context.Context, spec serverSpec, cert *benchCert, dir string) (*server, error) {
	if err := cert.install(dir); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	argv := append([]string{"-c", spec.cpus, spec.binary}, spec.args(port, dir)...)
	s := &server{spec: spec, port: port, logs: new(bytes.Buffer), exited: make(chan struct{})}
	s.cmd = exec.Command("taskset", argv...)
	s.cmd.Env = append(os.Environ(), spec.env...)
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", spec.kind, err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitReady(ctx, cert); err != nil {
		s.stop()
		return nil, fmt.Errorf("%s did not come up: %w\n%s", spec.kind, err, s.logs.String())
	}
	return s, nil
}

func (s *server) addr() string { return net.JoinHostPort(benchHost, strconv.Itoa(s.port)) }

func (s *server) waitReady(ctx context.Context, cert *benchCert) error {
	ctx, cancel := context.WithTimeout(ctx, serverStartTimeout)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: cert.tlsConfig()}, Timeout: time.Second}
	defer client.CloseIdleConnections()
	url := "https://" + s.addr() + "/derp/probe"
	for {
		select {
		case <-s.exited:
			return errors.New("process exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
}

// stop ends the relay (SIGTERM, then SIGKILL after a grace period).
func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
	}
}

// alive reports an error with the relay's logs if it has exited.
func (s *server) alive() error {
	select {
	case <-s.exited:
		return fmt.Errorf("%s exited during the benchmark:\n%s", s.spec.kind, s.logs.String())
	default:
		return nil
	}
}

// cpuSeconds is the relay's user+system CPU time so far, all threads of all
// its processes (derp-relay --workers N is N+1 processes).
func (s *server) cpuSeconds() (float64, error) { return sumOverTree(s.cmd.Process.Pid, procCPUSeconds) }

// rssBytes is the relay's resident set size, all its processes together.
func (s *server) rssBytes() (int64, error) { return sumOverTree(s.cmd.Process.Pid, procRSSBytes) }

// sumOverTree adds up one figure of pid and every descendant of it.
func sumOverTree[T int64 | float64](pid int, figure func(int) (T, error)) (T, error) {
	var total T
	for _, p := range processTree(pid) {
		v, err := figure(p)
		if err != nil {
			return 0, err
		}
		total += v
	}
	return total, nil
}

// processTree is pid and its descendants, from /proc/<pid>/task/<tid>/children.
func processTree(pid int) []int {
	tree := []int{pid}
	for i := 0; i < len(tree); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", tree[i]))
		for _, path := range tasks {
			data, _ := os.ReadFile(path)
			for _, field := range strings.Fields(string(data)) {
				if child, err := strconv.Atoi(field); err == nil {
					tree = append(tree, child)
				}
			}
		}
	}
	return tree
}

func procRSSBytes(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// procCPUSeconds reads utime+stime of a process from /proc/<pid>/stat.
func procCPUSeconds(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; the fields after it are
	// plain. utime and stime are fields 14 and 15.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	fields := strings.Fields(string(data[end+1:]))
	const utimeAt = 14 - 3 // fields[0] is field 3 (state)
	if len(fields) <= utimeAt+1 {
		return 0, errors.New("short /proc stat")
	}
	utime, err1 := strconv.ParseInt(fields[utimeAt], 10, 64)
	stime, err2 := strconv.ParseInt(fields[utimeAt+1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return float64(utime+stime) / clockTicksPerSecond, nil
}

// machineBusySeconds is the CPU time all processes used so far (/proc/stat:
// every field but idle and iowait, summed over CPUs).
func machineBusySeconds() (float64, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(firstLine(string(data)))
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, errors.New("malformed /proc/stat")
	}
	var busy int64
	for i, f := range fields[1:9] { // user nice system idle iowait irq softirq steal
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, err
		}
		if i != 3 && i != 4 {
			busy += n
		}
	}
	return float64(busy) / clockTicksPerSecond, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(benchHost, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
