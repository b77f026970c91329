// Package cputime reports a benchmark's throughput per CPU-second, which,
// unlike MB/s of wall time, does not change when other work shares the
// machine's cores.
package cputime

import (
	"syscall"
	"testing"
	"time"
)

// Process returns the CPU time (user + system) this process has used.
func Process() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Clock measures the process's CPU time from Start.
type Clock struct{ start time.Duration }

// Start starts a Clock.
func Start() Clock { return Clock{start: Process()} }

// Report adds the metric MB/cpu-s to b: bytes moved per CPU-second the
// whole process spent since Start (both ends, when a benchmark runs client
// and server in one process).
func (c Clock) Report(b *testing.B, bytes int64) {
	if used := Process() - c.start; used > 0 {
		b.ReportMetric(float64(bytes)/used.Seconds()/1e6, "MB/cpu-s")
	}
}
