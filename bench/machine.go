package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"
)

// machine describes where and what was measured.
type machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
	Python string `json:"python"`
	Derper string `json:"derper"`
	Relay  string `json:"relay"`
	Commit string `json:"commit"`
	// BeforeCommit is the checkout measured as derp-relay-before, if any.
	BeforeCommit string `json:"beforeCommit,omitempty"`
	Date         string `json:"date"`
	Loadgen      string `json:"loadgen"`
}

func describeMachine(relayBinary, derperBinary string) machine {
	m := machine{
		Go:      runtime.Version(),
		Date:    time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		Loadgen: "tailscale.com/derp/derphttp clients (" + tailscaleVersion() + ")",
	}
	m.CPU, m.Cores = cpuInfo()
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = "Linux " + strings.TrimSpace(string(data))
	}
	m.Derper = firstLine(output(derperBinary, "-version"))
	m.Relay = firstLine(output(relayBinary, "--version"))
	if python := interpreterOf(relayBinary); python != "" {
		m.Python = firstLine(output(python, "-c",
			"import sys, ssl\n"+
				"try:\n import uvloop; loop = 'uvloop ' + uvloop.__version__\n"+
				"except ImportError:\n loop = 'asyncio'\n"+
				"print('Python', sys.version.split()[0], '/', ssl.OPENSSL_VERSION, '/', loop)"))
	}
	commit := strings.TrimSpace(output("git", "rev-parse", "--short", "HEAD"))
	if commit != "" && strings.TrimSpace(output("git", "status", "--porcelain", "--", "../relay")) != "" {
		commit += " (relay/ modified)"
	}
	m.Commit = commit
	return m
}

// cpuInfo is the CPU's model name and the machine's cores, from /proc/cpuinfo
// (every core, not only those this process may use: bench/run pins it to one).
func cpuInfo() (model string, cores int) {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", 0
	}
	for line := range strings.Lines(string(data)) {
		name, value, _ := strings.Cut(line, ":")
		switch strings.TrimSpace(name) {
		case "model name":
			model = strings.TrimSpace(value)
		case "processor":
			cores++
		}
	}
	return model, cores
}

// machineCores is the number of cores of the machine, at least 1.
func machineCores() int {
	_, cores := cpuInfo()
	return max(cores, 1)
}

func (m machine) writeMarkdown(w io.Writer) {
	fmt.Fprintf(w, "- machine: %s, %d cores, %s\n", m.CPU, m.Cores, m.Kernel)
	fmt.Fprintf(w, "- derp-relay: %s at %s; %s\n", m.Relay, m.Commit, m.Python)
	fmt.Fprintf(w, "- derper: %s, built with %s\n", m.Derper, m.Go)
	fmt.Fprintf(w, "- load generator: %s\n", m.Loadgen)
	fmt.Fprintf(w, "- date: %s\n", m.Date)
}

// tailscaleVersion is the tailscale.com module this binary was built with.
func tailscaleVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "tailscale.com" {
				return "tailscale.com " + dep.Version
			}
		}
	}
	return "tailscale.com"
}

// interpreterOf reads the #! line of a console script (derp-relay).
func interpreterOf(script string) string {
	path, err := exec.LookPath(script)
	if err != nil {
		return ""
	}
	data, err := os.ReadFile(filepath.Clean(path))
	if err != nil || !strings.HasPrefix(string(data), "#!") {
		return ""
	}
	return strings.TrimSpace(strings.TrimPrefix(firstLine(string(data)), "#!"))
}

func output(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return ""
	}
	return string(out)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}
