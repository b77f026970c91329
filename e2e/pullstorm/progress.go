package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	liveInterval  = 250 * time.Millisecond // terminal: redraw one line
	plainInterval = 2 * time.Second        // pipe or file: one line each
	scrapeTimeout = time.Second
)

// agentBytes is the sum of the agents' starling_blob_bytes_total.
type agentBytes struct {
	Upstream, Peers, Seed int64
}

// progress reports a running pull storm.
type progress struct {
	out     io.Writer
	live    bool
	mode    string
	nodes   int
	total   int64 // bytes all clients will have pulled when done
	done    *atomic.Int64
	moved   *atomic.Int64
	egress  func() int64
	mirrors []string // agents to scrape /metrics from (p2p)
}

// start reports until the returned function is called; that function
// prints a last, final line.
func (p *progress) start(t0 time.Time) (stop func()) {
	interval := plainInterval
	if p.live {
		interval = liveInterval
	}
	// Without compression: gzipping every agent's /metrics on every scrape
	// cost the agents more CPU (counted as Starling's) than the scrape.
	client := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1, DisableCompression: true}, Timeout: scrapeTimeout}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
				p.print(t0, client, false)
			}
		}
	})
	return func() {
		close(quit)
		wg.Wait()
		p.print(t0, client, true)
		client.CloseIdleConnections()
	}
}

func (p *progress) print(t0 time.Time, client *http.Client, final bool) {
	line := fmt.Sprintf("[%s] %5.1fs  done %d/%d  pulled %s of %s  registry out %s",
		p.mode, time.Since(t0).Seconds(), p.done.Load(), p.nodes,
		fmtBytes(p.moved.Load()), fmtBytes(p.total), fmtBytes(p.egress()))
	if len(p.mirrors) > 0 {
		a := scrape(context.Background(), client, p.mirrors)
		line += fmt.Sprintf("  agents in: peers %s, seed %s, upstream %s",
			fmtBytes(a.Peers), fmtBytes(a.Seed), fmtBytes(a.Upstream))
	}
	switch {
	case p.live && final:
		fmt.Fprintf(p.out, "\r%s\x1b[K\n", line)
	case p.live:
		fmt.Fprintf(p.out, "\r%s\x1b[K", line)
	default:
		fmt.Fprintln(p.out, line)
	}
}

// scrapeAll sums the agents' byte counters with a client of its own.
func scrapeAll(ctx context.Context, mirrors []string) agentBytes {
	tr := &http.Transport{Proxy: nil, DisableCompression: true} // see start
	defer tr.CloseIdleConnections()
	return scrape(ctx, &http.Client{Transport: tr, Timeout: scrapeTimeout}, mirrors)
}

// scrape sums starling_blob_bytes_total over the agents' /metrics,
// concurrently. An agent that does not answer counts as zero: the display
// must not stall on one.
func scrape(ctx context.Context, client *http.Client, mirrors []string) agentBytes {
	var (
		mu  sync.Mutex
		sum agentBytes
		wg  sync.WaitGroup
	)
	for _, m := range mirrors {
		wg.Go(func() {
			a, err := scrapeOne(ctx, client, m+"/metrics")
			if err != nil {
				return
			}
			mu.Lock()
			sum.Upstream += a.Upstream
			sum.Peers += a.Peers
			sum.Seed += a.Seed
			mu.Unlock()
		})
	}
	wg.Wait()
	return sum
}

func scrapeOne(ctx context.Context, client *http.Client, u string) (agentBytes, error) {
	var a agentBytes
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return a, fmt.Errorf("metrics request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return a, fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return a, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return parseMetrics(resp.Body)
}

// parseMetrics reads starling_blob_bytes_total{source="..."} from
// Prometheus text.
func parseMetrics(r io.Reader) (agentBytes, error) {
	var a agentBytes
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), `starling_blob_bytes_total{source="`)
		if !ok {
			continue
		}
		src, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			return a, fmt.Errorf("metric %q: %w", sc.Text(), err)
		}
		switch src {
		case "upstream":
			a.Upstream = int64(f)
		case "peers":
			a.Peers = int64(f)
		case "seed":
			a.Seed = int64(f)
		}
	}
	if err := sc.Err(); err != nil {
		return a, fmt.Errorf("read metrics: %w", err)
	}
	return a, nil
}

// fmtBytes renders n in binary units.
func fmtBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		f /= unit
		if f < unit || u == "TiB" {
			return fmt.Sprintf("%.1f %s", f, u)
		}
	}
	return fmt.Sprintf("%d B", n) // not reached
}
