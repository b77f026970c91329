// Package chart draws completion-time CDFs as SVG, for the pull-storm
// benchmark and the simulator.
package chart

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// Series is one run's completion times.
type Series struct {
	// Label is the legend line.
	Label string
	// Completions are the finished nodes' completion times in seconds,
	// sorted.
	Completions []float64
	// Total is the number of nodes: nodes that did not finish keep the
	// curve below 100%.
	Total int
	// TMin, when positive, is drawn as a dashed vertical line.
	TMin float64
}

// WriteCDF draws each series' completion-time CDF with a dashed vertical
// line at its TMin.
func WriteCDF(w io.Writer, title string, series []Series) error {
	const (
		width, left, right, bott = 760.0, 70.0, 30.0, 60.0
		plotW, plotH             = width - left - right, 320.0
	)
	// The legend sits between the title and the plot, one line per series.
	top := 44 + 18*float64(len(series))
	height := top + plotH + bott
	xmax := 0.0
	for _, s := range series {
		if n := len(s.Completions); n > 0 {
			xmax = max(xmax, s.Completions[n-1])
		}
		xmax = max(xmax, s.TMin)
	}
	if xmax <= 0 {
		xmax = 1
	}
	step := niceStep(xmax * 1.05 / 8)
	xmax = math.Ceil(xmax*1.05/step) * step
	x := func(s float64) float64 { return left + s/xmax*plotW }
	colors := []string{"#1f77b4", "#d62728", "#2ca02c", "#9467bd"} // per series, in order
	y := func(frac float64) float64 { return top + (1-frac)*plotH }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
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

	for i, s := range series {
		color := colors[i%len(colors)]
		total := max(s.Total, len(s.Completions), 1)
		// Step CDF over all nodes. Thousands of nodes would make thousands
		// of steps; a step per pixel column is all the eye can see.
		var path strings.Builder
		fmt.Fprintf(&path, "M%.1f,%.1f", x(0), y(0))
		lastX := -1.0
		for k, t := range s.Completions {
			px := math.Round(x(t)*2) / 2
			if px == lastX && k+1 < len(s.Completions) && math.Round(x(s.Completions[k+1])*2)/2 == px {
				continue
			}
			lastX = px
			fmt.Fprintf(&path, " H%.1f V%.1f", px, y(float64(k+1)/float64(total)))
		}
		if len(s.Completions) > 0 {
			fmt.Fprintf(&path, " H%.1f", x(xmax))
		}
		fmt.Fprintf(&b, `<path d="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", path.String(), color)
		if s.TMin > 0 {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="1.5" stroke-dasharray="6 4"/>`+"\n",
				x(s.TMin), y(0), x(s.TMin), y(1), color)
		}
	}
	for i, s := range series {
		color := colors[i%len(colors)]
		ly := 52 + float64(i)*18
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", left+12, ly-4, left+36, ly-4, color)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", left+42, ly, html.EscapeString(s.Label))
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
