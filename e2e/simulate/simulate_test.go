package main

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/starling-oci/starling/agent/swarm"
)

// smallStorm is a storm small enough to simulate in-process under -race.
func smallStorm() Config {
	return Config{
		Nodes: 40, Size: 32 << 20, Layers: 4, PieceSize: 1 << 20,
		AgentBW: 10 << 20, SeedBW: 20 << 20, RegistryBW: 10 << 20, Latency: time.Millisecond,
		Supernodes: 1, Cores: 1, TrackerCost: 20 * time.Microsecond, Seed: 7,
		MaxInflight: 8, PerPeer: 2, AgentUploads: 4, SeedUploads: 8, StallTimeout: 15 * time.Second,
		ClientBlobs: 3, Prefetch: true, HaveInAnswers: true, Watch: swarm.DefaultWatch, Limit: 10 * time.Minute,
	}
}

// With a fixed tracker cost the simulation is a function of its seed: the
// scheduler and the tracker take time and randomness only as inputs.
func TestSimulationIsDeterministic(t *testing.T) {
	a, err := simulate(context.Background(), smallStorm())
	if err != nil {
		t.Fatal(err)
	}
	b, err := simulate(context.Background(), smallStorm())
	if err != nil {
		t.Fatal(err)
	}
	if a.Completed != a.Nodes {
		t.Fatalf("%d of %d nodes completed", a.Completed, a.Nodes)
	}
	if !slices.Equal(a.completions, b.completions) || a.Events != b.Events || a.TrackerRequests != b.TrackerRequests {
		t.Fatalf("two runs with one seed differ: %d vs %d events, %d vs %d tracker requests, max %v vs %v",
			a.Events, b.Events, a.TrackerRequests, b.TrackerRequests, a.CompletionS.Max, b.CompletionS.Max)
	}
	cfg := smallStorm()
	cfg.Seed++
	c, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(a.completions, c.completions) {
		t.Fatal("another seed gave the very same storm: the seed is not used")
	}
}

// A node that leaves mid-storm must not stop the others: every remaining
// agent completes, none goes to the registry.
func TestChurnEveryRemainingAgentCompletes(t *testing.T) {
	cfg := smallStorm()
	cfg.Churn = 0.2
	r, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Left != 8 || r.Completed != cfg.Nodes-r.Left || r.Incomplete != 0 {
		t.Fatalf("left %d, completed %d, incomplete %d of %d", r.Left, r.Completed, r.Incomplete, cfg.Nodes)
	}
	if r.Fallbacks != 0 || r.UpstreamEgressRatio > 1.01 {
		t.Fatalf("fallbacks %d, upstream egress %.3f: churn sent agents to the registry", r.Fallbacks, r.UpstreamEgressRatio)
	}
}

// Watched peers push their bitmaps as pieces land: the swarm's news does
// not wait for tracker polls. With no watches asked for there is no watch
// traffic.
func TestWatchesCarryNews(t *testing.T) {
	cfg := smallStorm()
	r, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Completed != cfg.Nodes {
		t.Fatalf("%d of %d completed", r.Completed, cfg.Nodes)
	}
	// Each download watches up to DefaultWatch peers.
	downloads := int64(cfg.Nodes * cfg.Layers)
	if r.Watches.Started < downloads {
		t.Fatalf("%d watches started for %d downloads", r.Watches.Started, downloads)
	}
	// News comes as pieces land: more bitmaps than watches.
	if r.Watches.News <= r.Watches.Started {
		t.Fatalf("%d watch messages for %d watches", r.Watches.News, r.Watches.Started)
	}
	cfg.Watch = 0
	r, err = simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Completed != cfg.Nodes || r.Watches != (WatchCounts{}) {
		t.Fatalf("no watches: completed %d of %d, watch traffic %+v", r.Completed, cfg.Nodes, r.Watches)
	}
}

// TestThousandNodeStorm runs the simulator binary (built without -race:
// this measures the swarm, not the detector) on the scenario at
// 1,000 nodes and checks its targets.
func TestThousandNodeStorm(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "simulate")
	build := exec.CommandContext(t.Context(), "go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	jsonPath := filepath.Join(dir, "sim.json")
	start := time.Now()
	cmd := exec.CommandContext(t.Context(), bin, "-nodes", "1000", "-size", "1GiB", "-layers", "4", "-piece-size", "4MiB",
		"-agent-bw", "100MiB", "-seed-bw", "200MiB", "-registry-bw", "100MiB", "-latency", "1ms", "-supernodes", "1",
		"-seed", "1", "-json", jsonPath)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("simulate: %v\n%s\n%s", err, stdout.String(), stderr.String())
	}
	t.Logf("simulated 1,000 nodes in %v:\n%s", time.Since(start).Round(time.Millisecond), stdout.String())
	r := readResult(t, jsonPath)
	if r.Nodes != 1000 || r.Completed != 1000 || r.Incomplete != 0 {
		t.Errorf("completed %d of %d (incomplete %d)", r.Completed, r.Nodes, r.Incomplete)
	}
	if r.Fallbacks != 0 {
		t.Errorf("fallbacks %d, want 0", r.Fallbacks)
	}
	if r.UpstreamEgressRatio > 1.01 {
		t.Errorf("upstream_egress_ratio %.4f > 1.01", r.UpstreamEgressRatio)
	}
	if r.SeedEgressRatio > 1.5 {
		t.Errorf("seed_egress_ratio %.3f > 1.5", r.SeedEgressRatio)
	}
	// Measured 1.30-1.31 (the target is 1.3): this catches a swarm
	// that regresses, not yet the target.
	if r.RatioToTMin > 1.5 {
		t.Errorf("ratio_to_t_min %.3f > 1.5", r.RatioToTMin)
	}
	if r.TMinS <= 0 || r.RatioToTMin <= 0 || r.TrackerRequests <= 0 || r.TrackerCPUS <= 0 {
		t.Errorf("t_min_s %v, ratio_to_t_min %v, tracker_requests %d, tracker_cpu_s %v: want all > 0",
			r.TMinS, r.RatioToTMin, r.TrackerRequests, r.TrackerCPUS)
	}
}

// A swarm too slow for the agents' patience must not send them all to the
// registry: stalled agents ask the owning supernode for a permit, and only
// a few per blob get one; the others keep using the swarm.
func TestStalledSwarmDoesNotStormTheRegistry(t *testing.T) {
	cfg := smallStorm()
	cfg.RegistryBW = 1 << 20           // a piece a second reaches the seed
	cfg.StallTimeout = 1 * time.Second // and the agents are impatient
	cfg.Limit = time.Hour
	r, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Completed != cfg.Nodes {
		t.Fatalf("%d of %d completed", r.Completed, cfg.Nodes)
	}
	t.Logf("fallbacks %d (at most %d at once for one blob), upstream egress %.2fx, max %.1f s",
		r.Fallbacks, r.MaxConcurrentFallbacks, r.UpstreamEgressRatio, r.CompletionS.Max)
	if r.MaxConcurrentFallbacks > 2 {
		t.Errorf("%d agents fetched one blob from the registry at once; permits allow 2", r.MaxConcurrentFallbacks)
	}
	if r.Fallbacks >= cfg.Nodes/2 {
		t.Errorf("%d of %d agents went to the registry", r.Fallbacks, cfg.Nodes)
	}
}

// TestRealityCheck runs the same small storm as real processes (the pull
// storm: a supernode and agents on loopback, an in-process registry) and
// in the simulator, and checks that they agree on the completion time.
// The 25% is met at the scale it names (the 32-node target storm:
// 47.16 s real, 46.40 s simulated, docs/BENCHMARKS.md). At this CI size the
// simulator is pessimistic by 23-25% on this machine under load, and an
// idle machine runs the real storm faster still, so this test allows 50%:
// enough to catch a simulator or a swarm that drifts by 2x, without
// failing CI on the known small-size bias. When the real run was bound by this machine's CPU (it used
// more than 80% of the cores), the simulator is told that machine: its
// cores, and the CPU the real run spent per GB (from its own report).
func TestRealityCheck(t *testing.T) {
	dir := t.TempDir()
	storm := filepath.Join(dir, "pullstorm")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", storm, "../pullstorm").CombinedOutput(); err != nil {
		t.Fatalf("go build pullstorm: %v\n%s", err, out)
	}
	args := []string{"-nodes", "12", "-size", "32MiB", "-layers", "4", "-agent-bw", "4MiB", "-seed-bw", "4MiB", "-registry-bw", "20MiB"}
	realJSON := filepath.Join(dir, "real.json")
	cmd := exec.CommandContext(t.Context(), storm, append(args, "-mode", "p2p", "-json", realJSON)...)
	if bin := os.Getenv("STARLING_E2E_BIN"); bin != "" {
		cmd.Args = append(cmd.Args, "-starling-bin", bin)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pullstorm: %v\n%s", err, out)
	}
	raw, err := os.ReadFile(realJSON)
	if err != nil {
		t.Fatal(err)
	}
	var real struct {
		Runs []struct {
			Nodes       int `json:"nodes"`
			FailedPulls int `json:"failed_pulls"`
			CompletionS struct {
				Max float64 `json:"max"`
			} `json:"completion_s"`
			CPUPerGB    float64 `json:"cpu_s_per_gb"`
			StarlingCPU float64 `json:"starling_cpu_s"`
			ClientsCPU  float64 `json:"clients_cpu_s"`
		} `json:"runs"`
	}
	if err := json.Unmarshal(raw, &real); err != nil || len(real.Runs) != 1 || real.Runs[0].FailedPulls != 0 {
		t.Fatalf("pullstorm JSON %s: %v", raw, err)
	}
	r := real.Runs[0]

	cfg := Config{
		Nodes: r.Nodes, Size: 32 << 20, Layers: 4, PieceSize: 1 << 20,
		AgentBW: 4 << 20, SeedBW: 4 << 20, RegistryBW: 20 << 20, Latency: 100 * time.Microsecond,
		Supernodes: 1, Cores: 1, Seed: 1, MaxInflight: 8, PerPeer: 2, AgentUploads: 4, SeedUploads: 8,
		StallTimeout: 15 * time.Second, ClientBlobs: 3, Prefetch: true, HaveInAnswers: true, Watch: swarm.DefaultWatch, Limit: 10 * time.Minute,
	}
	busy := (r.StarlingCPU + r.ClientsCPU) / (r.CompletionS.Max * float64(runtime.NumCPU()))
	if busy > 0.8 {
		cfg.HostCores, cfg.HostCPUPerGB = runtime.NumCPU(), r.CPUPerGB
	}
	sim, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	diff := math.Abs(sim.CompletionS.Max-r.CompletionS.Max) / r.CompletionS.Max
	t.Logf("real %.2f s (CPU %.0f%% busy, %.1f CPU-s per GB), simulated %.2f s: %.0f%% apart", r.CompletionS.Max, busy*100, r.CPUPerGB, sim.CompletionS.Max, diff*100)
	if diff > 0.5 {
		t.Errorf("real storm %.2f s, simulated %.2f s: more than 50%% apart", r.CompletionS.Max, sim.CompletionS.Max)
	}
}

// readResult reads a run's -json output.
func readResult(t *testing.T, path string) Result {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r Result
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return r
}

// The timeline accounts for the storm: samples every 250 ms of virtual
// time, link use within the links' capacity, the seed never losing a
// piece, and no more fetch outcomes than the run counted.
func TestTimelineAccountsForTheStorm(t *testing.T) {
	cfg := smallStorm()
	cfg.Timeline = true
	res, err := simulate(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	tl := res.Timeline
	if want := int(res.CompletionS.Max/sampleEvery.Seconds()) - 1; len(tl) < want {
		t.Fatalf("%d samples for a %.2f s storm, want at least %d", len(tl), res.CompletionS.Max, want)
	}
	pieces := cfg.Layers * int(cfg.Size/int64(cfg.Layers)/cfg.PieceSize)
	var got int64
	busiest := 0.0
	for k, smp := range tl {
		if want := float64(k+1) * sampleEvery.Seconds(); math.Abs(smp.T-want) > 1e-9 {
			t.Fatalf("sample %d at %.3f s, want %.3f s", k, smp.T, want)
		}
		if smp.Up < 0 || smp.Up > 1+1e-9 || smp.Down < smp.Up-1e-9 || smp.Down > 1+1e-9 {
			// Agents' downloads carry their uploads plus the seed's.
			t.Fatalf("sample %d: up %.3f, down %.3f", k, smp.Up, smp.Down)
		}
		if k > 0 && smp.SeedPieces < tl[k-1].SeedPieces || smp.SeedPieces > pieces || smp.AgentPieces > float64(pieces) {
			t.Fatalf("sample %d: seed %d, agents %.1f of %d pieces", k, smp.SeedPieces, smp.AgentPieces, pieces)
		}
		got += smp.Outcomes[0]
		busiest = max(busiest, smp.Up)
	}
	if got == 0 || got > res.Fetches[0] {
		t.Fatalf("timeline counts %d pieces got, the run %d", got, res.Fetches[0])
	}
	if busiest < 0.5 {
		t.Fatalf("agents' uploads never passed %.2f of their capacity: the swarm did not move", busiest)
	}
}
