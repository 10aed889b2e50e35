package main

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// cellShape is what one cell measures: the packet size, how the clients
// send, and, for the workers sweep, how many cores the relay has.
type cellShape struct {
	Size int `json:"size"`
	// Peers > 0: that many clients in a ring, each sending to the next (and
	// receiving from the one before); 0: the run's sender→receiver pairs.
	Peers int `json:"peers,omitempty"`
	// Workers > 0: a workers-sweep cell: derp-relay --workers N pinned to the
	// first N CPUs, derper pinned to the same CPUs; 0: the run's relay CPUs.
	Workers int `json:"workers,omitempty"`
}

// label names the cell in the table and the log: "1200 B, 100 peers".
func (s cellShape) label() string {
	l := sizeLabel(s.Size)
	if s.Peers > 0 {
		l += fmt.Sprintf(", %d peers", s.Peers)
	}
	if s.Workers > 0 {
		l += fmt.Sprintf(", CPUs %s (--workers %d)", sweepCPUs(s.Workers), s.Workers)
	}
	return l
}

// mainShapes are the cells measured on the run's relay CPUs: every size with
// the sender→receiver pairs, then the peers dimension.
func (c config) mainShapes() []cellShape {
	var out []cellShape
	for _, size := range c.Sizes {
		out = append(out, cellShape{Size: size})
	}
	for _, peers := range c.Peers {
		out = append(out, cellShape{Size: c.PeersSize, Peers: peers})
	}
	return out
}

// sweepShapes are the workers-sweep cells, one per worker count.
func (c config) sweepShapes() []cellShape {
	var out []cellShape
	for _, n := range c.SweepWorkers {
		out = append(out, cellShape{Size: c.SweepSize, Workers: n})
	}
	return out
}

// shapes is every cell of a run, in the order a round measures them.
func (c config) shapes() []cellShape { return append(c.mainShapes(), c.sweepShapes()...) }

// sweepCPUs is the taskset list of the first n CPUs, where a sweep cell with
// n workers runs: on a machine whose load generator has CPU 1, any n > 1
// shares that core with it.
func sweepCPUs(n int) string {
	if n == 1 {
		return "0"
	}
	return fmt.Sprintf("0-%d", n-1)
}

// parseWorkers reads the sweep's worker counts: numbers, and "cores" for
// every core of the machine; sorted, duplicates dropped ("1,2,cores" on a
// 2-core machine is 1,2).
func parseWorkers(s string, cores int) ([]int, error) {
	var out []int
	for field := range strings.SplitSeq(s, ",") {
		switch field = strings.TrimSpace(field); field {
		case "":
			continue
		case "cores":
			out = append(out, cores)
			continue
		}
		n, err := strconv.Atoi(field)
		if err != nil || n <= 0 || n > cores {
			return nil, fmt.Errorf("bad worker count %q: a number from 1 to the machine's %d cores, or \"cores\"", field, cores)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// cell is the result of one shape, if the run measured it.
func (s serverRun) cell(shape cellShape) (cellResult, bool) {
	for _, c := range s.Cells {
		if c.cellShape == shape {
			return c, true
		}
	}
	return cellResult{}, false
}
