// Command simulate runs a pull storm of thousands of virtual nodes under
// virtual time, driving the real swarm code: every agent's download policy
// is agent/swarm's Sched and every supernode is supernode/tracker's State.
// Only the network and the clock are simulated: per-node upload and
// download bandwidth shared equally by that node's transfers, per-link
// latency, upload slots and their 250 ms queue, the seed's upload and the
// registry's egress. Tracker calls are charged the CPU time the real code
// took, as service time on the supernode's cores, so a tracker whose cost
// grows with the swarm shows up as a slow storm. See docs/BENCHMARKS.md.
//
//	go run ./e2e/simulate -nodes 10000 -json sim.json -chart sim.svg
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/starling-oci/starling/agent/swarm"
	"github.com/starling-oci/starling/e2e/internal/chart"
	"github.com/starling-oci/starling/pkg/config"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := mainErr(ctx, os.Args[1:], os.Stdout, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "simulate:", err)
		stop()
		os.Exit(1)
	}
}

// byteFlag is a flag.Value for a byte count or rate with units (1GiB,
// 100MiB, 100MiB/s).
type byteFlag struct{ n *int64 }

func (f byteFlag) String() string {
	if f.n == nil {
		return "0"
	}
	return fmt.Sprint(*f.n)
}

func (f byteFlag) Set(s string) error {
	v, err := config.ParseBytes(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return err
	}
	*f.n = v
	return nil
}

// WatchCounts counts the watch protocol's traffic.
type WatchCounts struct {
	Started int64 `json:"started"`
	Refused int64 `json:"refused"`
	News    int64 `json:"news"`
}

// Result is the -json output.
type Result struct {
	Nodes               int         `json:"nodes"`
	Layers              int         `json:"layers"`
	PieceSize           int64       `json:"piece_size"`
	ImageBytes          int64       `json:"image_bytes"`
	CompletionS         Percentiles `json:"completion_s"`
	TMinS               float64     `json:"t_min_s"`
	RatioToTMin         float64     `json:"ratio_to_t_min"`
	UpstreamEgressRatio float64     `json:"upstream_egress_ratio"`
	SeedEgressRatio     float64     `json:"seed_egress_ratio"`
	Fallbacks           int         `json:"fallbacks"`
	// MaxConcurrentFallbacks is the most agents that fetched one blob from
	// the registry at the same time.
	MaxConcurrentFallbacks int     `json:"max_concurrent_fallbacks"`
	Completed              int     `json:"completed"`
	Left                   int     `json:"left"`
	Incomplete             int     `json:"incomplete"`
	TrackerRequests        int64   `json:"tracker_requests"`
	TrackerCPUS            float64 `json:"tracker_cpu_s"`
	// TrackerCPUPerS is tracker CPU per second of storm (core-seconds per
	// second, up to the last completion).
	TrackerCPUPerS float64 `json:"tracker_cpu_per_s"`
	// Seeds are when each blob's seed started and finished reading it
	// from the registry (seconds).
	Seeds [][2]float64 `json:"seed_fetch_s"`
	// Fetches counts piece fetch outcomes: got, dup, corrupt, busy,
	// unavailable, failed.
	Fetches [6]int64 `json:"fetches"`
	// Watches counts watch messages delivered (bitmaps pushed by watched
	// peers) and watches refused (the peer had MaxWatchers).
	Watches WatchCounts `json:"watches"`
	// Timeline is the swarm sampled every 250 ms of virtual time (-timeline).
	Timeline []Sample `json:"timeline,omitempty"`
	Events   uint64   `json:"events"`
	WallS    float64  `json:"wall_s"`

	// RegistryRequests are the requests the registry had, by kind (as
	// e2e/pullstorm's); Manifests the tag resolution's figures.
	RegistryRequests RegistryRequests `json:"registry_requests"`
	Manifests        ManifestStats    `json:"manifests"`

	completions []float64
}

// Percentiles of completion times in seconds.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func percentiles(sorted []float64) Percentiles {
	if len(sorted) == 0 {
		return Percentiles{}
	}
	rank := func(p float64) float64 {
		i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
		return sorted[min(max(i, 0), len(sorted)-1)]
	}
	return Percentiles{P50: rank(50), P99: rank(99), Max: sorted[len(sorted)-1]}
}

func mainErr(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg := Config{
		Nodes: 1000, Size: 1 << 30, Layers: 4, PieceSize: 4 << 20,
		AgentBW: 100 << 20, SeedBW: 200 << 20, RegistryBW: 100 << 20, Latency: time.Millisecond,
		Supernodes: 1, Cores: 1, Seed: 1, SlowBW: 10 << 20,
		MaxInflight: 8, PerPeer: 2, AgentUploads: 4, SeedUploads: 8, StallTimeout: 15 * time.Second, ClientBlobs: 3,
		Limit: time.Hour, Manifests: ManifestConfig{TagTTL: time.Second, RegistryLatency: 20 * time.Millisecond},
	}
	fs := flag.NewFlagSet("simulate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.Nodes, "nodes", cfg.Nodes, "agents, each pulling the image at time 0")
	fs.Var(byteFlag{&cfg.Size}, "size", "image payload, split evenly over -layers")
	fs.IntVar(&cfg.Layers, "layers", cfg.Layers, "layers (blobs) in the image")
	fs.Var(byteFlag{&cfg.PieceSize}, "piece-size", "swarm piece size")
	fs.Var(byteFlag{&cfg.AgentBW}, "agent-bw", "each agent's upload and download in bytes/s; 0 = unlimited")
	fs.Var(byteFlag{&cfg.SeedBW}, "seed-bw", "each supernode's upload in bytes/s; 0 = unlimited")
	fs.Var(byteFlag{&cfg.RegistryBW}, "registry-bw", "the registry's egress in bytes/s; 0 = unlimited")
	fs.DurationVar(&cfg.Latency, "latency", cfg.Latency, "one-way latency of every link")
	fs.IntVar(&cfg.Supernodes, "supernodes", cfg.Supernodes, "supernodes (blobs are owned by rendezvous hashing)")
	fs.IntVar(&cfg.Cores, "supernode-cores", cfg.Cores, "CPU cores each supernode gives its tracker")
	fs.DurationVar(&cfg.TrackerCost, "tracker-cost", 0, "CPU charged per tracker call; 0 = the real call's measured time")
	fs.Float64Var(&cfg.Churn, "churn", 0, "fraction of agents that leave (crash) at a random moment of the storm")
	fs.Float64Var(&cfg.Slow, "slow", 0, "fraction of agents with -slow-bw links")
	fs.Var(byteFlag{&cfg.SlowBW}, "slow-bw", "upload and download of slow agents in bytes/s")
	fs.Uint64Var(&cfg.Seed, "seed", cfg.Seed, "random seed (peer IDs, piece orders, churn)")
	fs.IntVar(&cfg.MaxInflight, "max-inflight", cfg.MaxInflight, "agent: concurrent piece downloads")
	fs.IntVar(&cfg.AgentUploads, "max-uploads", cfg.AgentUploads, "agent: concurrent piece uploads")
	fs.IntVar(&cfg.SeedUploads, "seed-uploads", cfg.SeedUploads, "supernode: concurrent piece uploads")
	fs.DurationVar(&cfg.StallTimeout, "stall-timeout", cfg.StallTimeout, "agent: stall timeout")
	fs.BoolVar(&cfg.Prefetch, "prefetch", true, "agent: start every layer's fill when the manifest is pulled (the agent's default); false: when the client asks for the blob")
	fs.BoolVar(&cfg.HaveInAnswers, "have-in-answers", true, "piece answers carry the server's bitmap (as pkg/pieceserver's do; false to see what that is worth)")
	fs.IntVar(&cfg.Watch, "watch", swarm.DefaultWatch, "agent: peers whose bitmaps each download watches over /starling/watch/1 (0: none, to see what that is worth)")
	fs.Float64Var(&cfg.TrackerBlobRate, "tracker-blob-rate", 0, "tracker: requests per second per blob its interval aims at (0: its default)")
	fs.Float64Var(&cfg.TrackerTotalRate, "tracker-total-rate", 0, "tracker: requests per second overall its interval aims at (0: its default)")
	fs.IntVar(&cfg.HostCores, "host-cores", 0, "model every node on one machine with this many cores (the loopback pull storm); 0 = separate machines")
	fs.Float64Var(&cfg.HostCPUPerGB, "host-cpu-per-gb", 0, "with -host-cores: CPU-seconds the machine spends per GB of piece bytes (pullstorm reports cpu_s_per_gb)")
	fs.BoolVar(&cfg.Timeline, "timeline", false, "add to the -json output the swarm sampled every 250 ms of virtual time: link use, agents' lag behind the seed, queued requests, fetch outcomes")
	fs.DurationVar(&cfg.Limit, "limit", cfg.Limit, "bound on virtual time")
	addManifestFlags(fs, &cfg.Manifests)
	jsonPath := fs.String("json", "", "write the results as JSON to this file")
	chartPath := fs.String("chart", "", "write an SVG of the completion-time CDF to this file")
	cpuProfile := fs.String("cpuprofile", "", "write the simulator's CPU profile to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	switch {
	case cfg.Nodes < 1, cfg.Layers < 1, cfg.Supernodes < 1, cfg.Cores < 1:
		return errors.New("-nodes, -layers, -supernodes and -supernode-cores must be at least 1")
	case cfg.Size < int64(cfg.Layers):
		return errors.New("-size is smaller than one byte per layer")
	case cfg.Churn < 0 || cfg.Churn >= 1 || cfg.Slow < 0 || cfg.Slow > 1:
		return errors.New("-churn must be in [0, 1) and -slow in [0, 1]")
	}
	fmt.Fprintf(stdout, "simulated storm: %d nodes, %s in %d layers, piece %s; agent %s, seed %s x %d, registry %s, latency %v\n",
		cfg.Nodes, fmtBytes(cfg.Size), cfg.Layers, fmtBytes(cfg.PieceSize), fmtRate(cfg.AgentBW), fmtRate(cfg.SeedBW), cfg.Supernodes,
		fmtRate(cfg.RegistryBW), cfg.Latency)
	cfg.Progress = func(p Progress) {
		fmt.Fprintf(stderr, "virtual %6.2f s  done %d/%d  running %d  events %d  tracker requests %d  registry requests %d  wall %.1f s\n",
			p.Virtual.Seconds(), p.Done, cfg.Nodes, p.Running, p.Events, p.Requests, p.Registry.Total(), p.Wall.Seconds())
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("create %s: %w", *cpuProfile, err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("start CPU profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	// The loop allocates many short-lived closures; trading memory for
	// fewer collections roughly halves the time spent in GC.
	debug.SetGCPercent(400)
	res, err := simulate(ctx, cfg)
	if err != nil {
		return err
	}
	printSummary(stdout, res)
	var errs []error
	if *jsonPath != "" {
		errs = append(errs, writeFile(*jsonPath, func(w io.Writer) error {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			return enc.Encode(res)
		}))
	}
	if *chartPath != "" {
		errs = append(errs, writeFile(*chartPath, func(w io.Writer) error {
			label := fmt.Sprintf("simulated p2p: max %.2f s, T_min %.2f s (dashed), upstream egress %.3f, seed egress %.2f, %d fallbacks",
				res.CompletionS.Max, res.TMinS, res.UpstreamEgressRatio, res.SeedEgressRatio, res.Fallbacks)
			title := fmt.Sprintf("Simulated pull storm: completion-time CDF (%d nodes, %s image)", res.Nodes, fmtBytes(res.ImageBytes))
			return chart.WriteCDF(w, title, []chart.Series{{Label: label, Completions: res.completions, Total: res.Nodes - res.Left, TMin: res.TMinS}})
		}))
	}
	return errors.Join(errs...)
}

// simulate runs one storm and measures it.
func simulate(ctx context.Context, cfg Config) (*Result, error) {
	wall := time.Now()
	s, err := newSim(cfg)
	if err != nil {
		return nil, err
	}
	s.stop = ctx.Done()
	s.run()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("interrupted at virtual %v: %w", time.Duration(s.now), err)
	}
	res := &Result{Nodes: cfg.Nodes, Layers: cfg.Layers, PieceSize: cfg.PieceSize, ImageBytes: cfg.Size, TMinS: s.tMin(),
		Fallbacks: s.fallbacks, MaxConcurrentFallbacks: s.maxFetching, Left: s.left, TrackerRequests: s.trackerRequests, TrackerCPUS: s.trackerCPU.Seconds(), Events: s.count}
	for _, a := range s.agents {
		switch {
		case a.done >= 0:
			res.completions = append(res.completions, time.Duration(a.done).Seconds())
		case !a.n.dead:
			res.Incomplete++
		}
	}
	slices.Sort(res.completions)
	res.Completed = len(res.completions)
	res.CompletionS = percentiles(res.completions)
	if res.TMinS > 0 {
		res.RatioToTMin = res.CompletionS.Max / res.TMinS
	}
	res.UpstreamEgressRatio = s.registry.moved / float64(cfg.Size)
	seed := 0.0
	for _, sn := range s.sns {
		seed += sn.n.up.moved
	}
	res.SeedEgressRatio = seed / float64(cfg.Size)
	res.Fetches = s.outcomes
	res.Watches = s.watches
	res.Timeline = s.timeline
	res.RegistryRequests, res.Manifests = s.mf.result()
	for _, b := range s.blobs {
		if st := b.owner.seeds[b.idx]; st != nil {
			res.Seeds = append(res.Seeds, [2]float64{time.Duration(st.started).Seconds(), time.Duration(st.done).Seconds()})
		}
	}
	if res.CompletionS.Max > 0 {
		res.TrackerCPUPerS = res.TrackerCPUS / res.CompletionS.Max
	}
	res.WallS = time.Since(wall).Seconds()
	return res, nil
}

func printSummary(w io.Writer, r *Result) {
	fmt.Fprintf(w, "completed %d of %d (%d left mid-storm, %d incomplete), fallbacks %d (at most %d at once for one blob)\n",
		r.Completed, r.Nodes, r.Left, r.Incomplete, r.Fallbacks, r.MaxConcurrentFallbacks)
	fmt.Fprintf(w, "completion p50 %.2f s, p99 %.2f s, max %.2f s; T_min %.2f s; max/T_min %.3f\n",
		r.CompletionS.P50, r.CompletionS.P99, r.CompletionS.Max, r.TMinS, r.RatioToTMin)
	fmt.Fprintf(w, "upstream egress %.4fx the image, supernode upload %.3fx\n", r.UpstreamEgressRatio, r.SeedEgressRatio)
	fmt.Fprintf(w, "tracker: %d requests, %.2f CPU-s (%.3f core-s per s of storm)\n", r.TrackerRequests, r.TrackerCPUS, r.TrackerCPUPerS)
	fmt.Fprintf(w, "seed fetches (start, end in s): %v\n", r.Seeds)
	fmt.Fprintf(w, "piece fetches: got %d, dup %d, corrupt %d, busy %d, unavailable %d, failed %d\n",
		r.Fetches[0], r.Fetches[1], r.Fetches[2], r.Fetches[3], r.Fetches[4], r.Fetches[5])
	fmt.Fprintf(w, "watches: %d started, %d refused, %d bitmaps pushed\n", r.Watches.Started, r.Watches.Refused, r.Watches.News)
	printManifests(w, r.RegistryRequests, r.Manifests)
	fmt.Fprintf(w, "%d events in %.1f s of wall time\n", r.Events, r.WallS)
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	return nil
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func fmtRate(n int64) string {
	if n <= 0 {
		return "unlimited"
	}
	return fmtBytes(n) + "/s"
}
