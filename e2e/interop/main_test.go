package interop

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Tailscale's binaries the tests run, built from the pinned module: taken
// from $DERPER, $STUNC and $DERPPROBE when e2e/interop/run built them into
// the cache, otherwise built here once.
var (
	derperPath    string
	stuncPath     string
	derpprobePath string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if _, err := exec.LookPath(relayBinary); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %s is not on PATH; run `make interop` (or e2e/interop/run with the relay's virtualenv on PATH)\n", relayBinary)
		return 1
	}
	tools := []struct {
		path      *string
		env, name string
	}{
		{&derperPath, "DERPER", "derper"},
		{&stuncPath, "STUNC", "stunc"},
		{&derpprobePath, "DERPPROBE", "derpprobe"},
	}
	var dir string
	for _, tool := range tools {
		if *tool.path = os.Getenv(tool.env); *tool.path != "" {
			continue
		}
		if dir == "" {
			var err error
			if dir, err = os.MkdirTemp("", "interop-tools-"); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
		}
		*tool.path = filepath.Join(dir, tool.name)
		build := exec.Command("go", "build", "-o", *tool.path, "tailscale.com/cmd/"+tool.name)
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: building tailscale.com/cmd/%s: %v\n", tool.name, err)
			return 1
		}
	}
	return m.Run()
}
