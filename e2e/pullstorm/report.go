package main

import (
	"fmt"
	"html"
	"io"
	"math"
	"runtime"
	"strings"
	"text/tabwriter"
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
	const labelWidth = len("image (unique blob bytes)")
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
	row("CPU: clients (pullstorm)", func(r RunResult) string { return secs(r.ClientsCPU.Seconds()) })
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
	const (
		width, left, right, bott = 760.0, 70.0, 30.0, 60.0
		plotW, plotH             = width - left - right, 320.0
	)
	// The legend sits between the title and the plot, one line per run.
	top := 44 + 18*float64(len(runs))
	height := top + plotH + bott
	xmax := 0.0
	for _, r := range runs {
		xmax = max(xmax, r.CompletionS.Max, r.TMinS)
	}
	if xmax <= 0 {
		xmax = 1
	}
	step := niceStep(xmax * 1.05 / 8)
	xmax = math.Ceil(xmax*1.05/step) * step
	x := func(s float64) float64 { return left + s/xmax*plotW }
	colors := []string{"#1f77b4", "#d62728", "#2ca02c", "#9467bd"} // per run, in order
	y := func(frac float64) float64 { return top + (1-frac)*plotH }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	title := "Pull storm: completion-time CDF"
	if len(runs) > 0 {
		title += fmt.Sprintf(" (%d nodes, %s image)", runs[0].Nodes, fmtBytes(runs[0].ImageBytes))
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="24" text-anchor="middle" font-size="15">%s</text>`+"\n", width/2, html.EscapeString(title))
	// Grid and axes.
	for s := 0.0; s <= xmax+step/2; s += step {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(s), y(0), x(s), y(1))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x(s), y(0)+18, trimFloat(s))
	}
	for f := 0.0; f <= 1.0001; f += 0.25 {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(0), y(f), x(xmax), y(f))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%.0f%%</text>`+"\n", x(0)-6, y(f)+4, f*100)
	}
	fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333"/>`+"\n", left, top, plotW, plotH)
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">completion time since the common start (s)</text>`+"\n", left+plotW/2, height-18)
	fmt.Fprintf(&b, `<text transform="translate(18 %.1f) rotate(-90)" text-anchor="middle">nodes done</text>`+"\n", top+plotH/2)

	for i, r := range runs {
		color := colors[i%len(colors)]
		// Step CDF over all nodes: failed pulls keep it below 100%.
		var path strings.Builder
		fmt.Fprintf(&path, "M%.1f,%.1f", x(0), y(0))
		for k, t := range r.Completions {
			fmt.Fprintf(&path, " H%.1f V%.1f", x(t), y(float64(k+1)/float64(r.Nodes)))
		}
		if len(r.Completions) > 0 {
			fmt.Fprintf(&path, " H%.1f", x(xmax))
		}
		fmt.Fprintf(&b, `<path d="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", path.String(), color)
		if r.TMinS > 0 {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="1.5" stroke-dasharray="6 4"/>`+"\n",
				x(r.TMinS), y(0), x(r.TMinS), y(1), color)
		}
	}
	for i, r := range runs {
		color := colors[i%len(colors)]
		ly := 52 + float64(i)*18
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", left+12, ly-4, left+36, ly-4, color)
		label := fmt.Sprintf("%s: max %.2f s, T_min %.2f s (dashed), egress ratio %.2f", r.Mode, r.CompletionS.Max, r.TMinS, r.EgressRatio)
		if r.FailedPulls > 0 {
			label += fmt.Sprintf(", %d failed", r.FailedPulls)
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", left+42, ly, html.EscapeString(label))
	}
	b.WriteString("</svg>\n")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write chart: %w", err)
	}
	return nil
}

// niceStep rounds v up to 1, 2 or 5 times a power of ten.
func niceStep(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}
