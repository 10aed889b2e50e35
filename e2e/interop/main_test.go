package interop

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// derperPath is Tailscale's derper built from the pinned module: $DERPER when
// e2e/interop/run built it into the cache, otherwise built here once.
var derperPath string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if _, err := exec.LookPath(relayBinary); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %s is not on PATH; run `make interop` (or e2e/interop/run with the relay's virtualenv on PATH)\n", relayBinary)
		return 1
	}
	derperPath = os.Getenv("DERPER")
	if derperPath == "" {
		dir, err := os.MkdirTemp("", "interop-derper-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		derperPath = filepath.Join(dir, "derper")
		build := exec.Command("go", "build", "-o", derperPath, "tailscale.com/cmd/derper")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: building tailscale.com/cmd/derper: %v\n", err)
			return 1
		}
	}
	return m.Run()
}
