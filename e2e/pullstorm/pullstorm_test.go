package main

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSmallPullStorm runs a small storm in both modes and checks
// correctness only (timings on a shared CI machine prove nothing): every
// pull verified, the image crossed the registry link once in p2p mode, and
// nothing is left behind.
func TestSmallPullStorm(t *testing.T) {
	var out strings.Builder
	cfg := Config{
		Nodes: 4, Size: 8 << 20, Layers: 2, PieceSize: 1 << 20,
		AgentBW: 8 << 20, SeedBW: 8 << 20, RegistryBW: 16 << 20,
		Modes: []string{modeP2P, modeDirect}, Repo: "pullstorm/test",
		StarlingBin: os.Getenv("STARLING_E2E_BIN"), Race: raceEnabled,
		Timeout: 2 * time.Minute, Out: &out,
	}
	start := time.Now()
	res, err := run(t.Context(), cfg)
	t.Logf("run took %v; its output:\n%s", time.Since(start).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if len(res.Runs) != 2 {
		t.Fatalf("got %d runs, want 2 (p2p, direct)", len(res.Runs))
	}
	for _, r := range res.Runs {
		if r.FailedPulls != 0 {
			t.Errorf("%s: %d failed pulls", r.Mode, r.FailedPulls)
		}
		if len(r.Completions) != cfg.Nodes {
			t.Errorf("%s: %d completion times, want %d", r.Mode, len(r.Completions), cfg.Nodes)
		}
		if r.ImageBytes < cfg.Size {
			t.Errorf("%s: image_bytes %d < payload %d", r.Mode, r.ImageBytes, cfg.Size)
		}
		if r.TMinS <= 0 || r.RatioToTMin <= 0 {
			t.Errorf("%s: t_min_s %v, ratio_to_t_min %v; want both > 0", r.Mode, r.TMinS, r.RatioToTMin)
		}
	}
	p2p, direct := res.Runs[0], res.Runs[1]
	if p2p.Mode != modeP2P || direct.Mode != modeDirect {
		t.Fatalf("modes %q, %q; want p2p, direct", p2p.Mode, direct.Mode)
	}
	if p2p.EgressRatio > 1.02 {
		t.Errorf("p2p egress_ratio %.4f > 1.02: the image crossed the registry link more than once", p2p.EgressRatio)
	}
	// The baseline proves the counter counts: every node fetched every blob.
	if direct.EgressRatio < float64(cfg.Nodes) {
		t.Errorf("direct egress_ratio %.4f < %d nodes", direct.EgressRatio, cfg.Nodes)
	}
	// The registry sees a rollout, not N pulls: one resolution of the tag
	// and one manifest GET for the cluster, one GET per blob.
	blobs := int64(p2p.Blobs)
	if rq := p2p.RegistryRequests; rq.ManifestGet > 1 || rq.BlobGet != blobs || rq.Total() > 10+blobs {
		t.Errorf("p2p registry_requests %+v (total %d) for %d blobs: want manifest_get <= 1, blob_get = %d, total <= %d",
			rq, rq.Total(), blobs, blobs, 10+blobs)
	}
	if rq := direct.RegistryRequests; rq.ManifestGet < int64(cfg.Nodes) || rq.BlobGet < int64(cfg.Nodes)*blobs {
		t.Errorf("direct registry_requests %+v: want a manifest GET per node and every blob per node", rq)
	}
	if p2p.AgentMaxRSSBytes <= 0 {
		t.Errorf("p2p agent_max_rss_bytes %d, want > 0", p2p.AgentMaxRSSBytes)
	}
	// The pull moved bytes through the Starling processes, which costs CPU;
	// direct mode runs none.
	if p2p.StarlingCPUS <= 0 || p2p.CPUSPerGB <= 0 {
		t.Errorf("p2p starling_cpu_s %v, cpu_s_per_gb %v; want both > 0", p2p.StarlingCPUS, p2p.CPUSPerGB)
	}
	if direct.StarlingCPUS != 0 || direct.ClientsCPUS <= 0 {
		t.Errorf("direct starling_cpu_s %v (want 0), clients_cpu_s %v (want > 0)", direct.StarlingCPUS, direct.ClientsCPUS)
	}

	// A supernode and an agent per node were started, and all are gone.
	if len(res.PIDs) != cfg.Nodes+1 {
		t.Errorf("run reports %d processes, want %d (supernode and agents)", len(res.PIDs), cfg.Nodes+1)
	}
	for _, pid := range res.PIDs {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d still exists after run (kill -0: %v)", pid, err)
		}
	}
	if res.WorkDir == "" {
		t.Fatal("run reports no work dir")
	}
	if _, err := os.Stat(res.WorkDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("work dir %s not removed (stat: %v)", res.WorkDir, err)
	}
}
