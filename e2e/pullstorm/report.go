package main

import (
	"fmt"
	"io"
	"math"
	"runtime"
	"strings"
	"text/tabwriter"

	"github.com/starling-oci/starling/e2e/internal/chart"
)

// percentiles returns nearest-rank percentiles of sorted values.
func percentiles(sorted []float64) Percentiles {
	if len(sorted) == 0 {
		return Percentiles{}
	}
	rank := func(p float64) float64 {
		i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
		return sorted[min(max(i, 0), len(sorted)-1)]
	}
	return Percentiles{P50: rank(50), P95: rank(95), P99: rank(99), Max: sorted[len(sorted)-1]}
}

// tMin is the minimum time to get f bytes to n nodes over the emulated
// links (bytes/s; 0 = unlimited, that bound then drops out).
//
// p2p, after Kumar & Ross (2006), with the registry link added as a bound
// (the seed must get every byte from the registry once):
//
//	T_min = max(F/u_s, F/d_min, N*F/(u_s + sum u_i), F/R)
//
// with u_s = seedBW, u_i = d_min = agentBW. direct: every node fetches F
// from the registry over its own download link:
//
//	T_min = max(F/d, N*F/R)
func tMin(mode string, n int, f float64, agentBW, seedBW, registryBW int64) float64 {
	div := func(num float64, rate int64) float64 {
		if rate <= 0 {
			return 0
		}
		return num / float64(rate)
	}
	nodes := float64(n)
	if mode == modeDirect {
		return max(div(f, agentBW), div(nodes*f, registryBW))
	}
	t := max(div(f, seedBW), div(f, agentBW), div(f, registryBW))
	if seedBW > 0 && agentBW > 0 { // else the aggregate upload is unlimited
		t = max(t, nodes*f/(float64(seedBW)+nodes*float64(agentBW)))
	}
	return t
}

// printTable writes one column per mode, side by side.
func printTable(w io.Writer, runs []RunResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', tabwriter.AlignRight)
	// Labels padded to one width read left-aligned in right-aligned cells.
	const labelWidth = len("CPU: Starling (agents + supernode)")
	row := func(label string, f func(r RunResult) string) {
		cells := []string{fmt.Sprintf("%-*s", labelWidth, label)}
		for _, r := range runs {
			cells = append(cells, f(r))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t")+"\t")
	}
	secs := func(v float64) string { return fmt.Sprintf("%.2f s", v) }
	row("", func(r RunResult) string { return r.Mode })
	row("nodes", func(r RunResult) string { return fmt.Sprint(r.Nodes) })
	row("image (unique blob bytes)", func(r RunResult) string { return fmtBytes(r.ImageBytes) })
	row("registry egress", func(r RunResult) string { return fmtBytes(r.RegistryEgressBytes) })
	row("egress ratio", func(r RunResult) string { return fmt.Sprintf("%.3f", r.EgressRatio) })
	row("registry requests (pull)", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.Total()) })
	row("  manifest GET", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.ManifestGet) })
	row("  manifest HEAD", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.ManifestHead) })
	row("  blob GET", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.BlobGet) })
	row("  blob HEAD", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.BlobHead) })
	row("  other", func(r RunResult) string { return fmt.Sprint(r.RegistryRequests.Other) })
	row("completion p50", func(r RunResult) string { return secs(r.CompletionS.P50) })
	row("completion p95", func(r RunResult) string { return secs(r.CompletionS.P95) })
	row("completion p99", func(r RunResult) string { return secs(r.CompletionS.P99) })
	row("completion max", func(r RunResult) string { return secs(r.CompletionS.Max) })
	row("T_min", func(r RunResult) string { return secs(r.TMinS) })
	row("max / T_min", func(r RunResult) string { return fmt.Sprintf("%.2f", r.RatioToTMin) })
	row("failed pulls", func(r RunResult) string { return fmt.Sprint(r.FailedPulls) })
	row("agent peak RSS (max)", func(r RunResult) string { return dash(r.Mode, fmtBytes(r.AgentMaxRSSBytes)) })
	row("agents got from peers", func(r RunResult) string { return dash(r.Mode, fmtBytes(r.Agents.Peers)) })
	row("agents got from seed", func(r RunResult) string { return dash(r.Mode, fmtBytes(r.Agents.Seed)) })
	row("agents got from upstream", func(r RunResult) string { return dash(r.Mode, fmtBytes(r.Agents.Upstream)) })
	row("setup before the barrier", func(r RunResult) string { return secs(r.Setup.Seconds()) })
	// CPU against what the machine had during the pull tells a run bound
	// by the emulated links from one bound by this machine's cores.
	row("CPU: machine had", func(r RunResult) string {
		return secs(r.Pull.Seconds() * float64(runtime.NumCPU()))
	})
	row("CPU: agents", func(r RunResult) string { return dash(r.Mode, secs(r.AgentsCPU.Seconds())) })
	row("CPU: supernode", func(r RunResult) string { return dash(r.Mode, secs(r.SupernodeCPU.Seconds())) })
	row("CPU: Starling (agents + supernode)", func(r RunResult) string { return dash(r.Mode, secs(r.StarlingCPUS)) })
	row("CPU: clients (pullstorm)", func(r RunResult) string { return secs(r.ClientsCPUS) })
	row("CPU-s per GB delivered", func(r RunResult) string { return dash(r.Mode, fmt.Sprintf("%.2f", r.CPUSPerGB)) })
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print table: %w", err)
	}
	return nil
}

func dash(mode, s string) string {
	if mode != modeP2P {
		return "-"
	}
	return s
}

// writeChart draws the completion-time CDF of each run as an SVG, with a
// dashed vertical line at each run's T_min.
func writeChart(w io.Writer, runs []RunResult) error {
	title := "Pull storm: completion-time CDF"
	if len(runs) > 0 {
		title += fmt.Sprintf(" (%d nodes, %s image)", runs[0].Nodes, fmtBytes(runs[0].ImageBytes))
	}
	var series []chart.Series
	for _, r := range runs {
		label := fmt.Sprintf("%s: max %.2f s, T_min %.2f s (dashed), egress ratio %.2f", r.Mode, r.CompletionS.Max, r.TMinS, r.EgressRatio)
		if r.FailedPulls > 0 {
			label += fmt.Sprintf(", %d failed", r.FailedPulls)
		}
		series = append(series, chart.Series{Label: label, Completions: r.Completions, Total: r.Nodes, TMin: r.TMinS})
	}
	return chart.WriteCDF(w, title, series)
}
