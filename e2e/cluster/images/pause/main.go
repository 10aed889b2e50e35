// Command pause is the process of the test node's pod sandboxes: it holds the
// pod's namespaces open, reaps orphans when it is the pod's PID 1, and exits
// on SIGTERM or SIGINT. No image registry is reachable from the tests, so the
// sandbox image is built here from this program.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
