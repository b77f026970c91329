package main

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/starling-oci/starling/pkg/ratelimit"
)

// Modes.
const (
	modeP2P    = "p2p"
	modeDirect = "direct"
)

// Config is one pull-storm benchmark.
type Config struct {
	Nodes     int   // pulling nodes (agents in p2p mode)
	Size      int64 // image payload bytes, spread over Layers
	Layers    int
	PieceSize int64 // swarm piece size
	// Emulated links in bytes/s, 0 = unlimited. AgentBW caps each agent's
	// upload and download (in direct mode, each node's download); SeedBW
	// the supernode's upload; RegistryBW the registry's egress.
	AgentBW, SeedBW, RegistryBW int64
	Modes                       []string // modeP2P and/or modeDirect, run in this order

	// Registry is an external registry (http(s)://host[:port]) to push to
	// and pull from through a local counting, rate-limited proxy; empty
	// starts an embedded in-memory registry per mode.
	Registry string
	Repo     string // repository of the pushed image

	StarlingBin string        // prebuilt starling binary; empty = go build ./cmd/starling
	Race        bool          // build starling with -race
	ModuleRoot  string        // where to build from; empty = found from the working directory
	Timeout     time.Duration // bound on one mode's pull phase
	Keep        bool          // keep the work dir (logs, data) instead of removing it
	LogLevel    string        // starling's --log-level; empty = info

	Out  io.Writer // status and progress; nil = none
	Live bool      // Out is a terminal: redraw one progress line in place
}

// Result is what run measured, plus what it started (for tests).
type Result struct {
	Runs []RunResult `json:"runs"`
	// PIDs are the supernode and agent processes run started; all have
	// exited when it returns. (The go build and swarm-key commands it
	// also runs are waited for on the spot.)
	PIDs []int `json:"-"`
	// WorkDir held binaries, data and logs; removed on return unless Keep.
	WorkDir string `json:"-"`
}

// RunResult is one mode's figures.
type RunResult struct {
	Mode                string      `json:"mode"`
	Nodes               int         `json:"nodes"`
	ImageBytes          int64       `json:"image_bytes"`
	RegistryEgressBytes int64       `json:"registry_egress_bytes"`
	EgressRatio         float64     `json:"egress_ratio"`
	CompletionS         Percentiles `json:"completion_s"`
	TMinS               float64     `json:"t_min_s"`
	RatioToTMin         float64     `json:"ratio_to_t_min"`
	FailedPulls         int         `json:"failed_pulls"`
	AgentMaxRSSBytes    int64       `json:"agent_max_rss_bytes"`
	// StarlingCPUS is the CPU time (user + system, from /proc) every
	// Starling process (agents and supernode) used during the pull, from
	// the barrier to the last pull's end; ClientsCPUS is this process's
	// (the pulling clients'); CPUSPerGB is StarlingCPUS per GB delivered
	// (nodes x image bytes / 1e9). Direct mode runs no Starling process.
	StarlingCPUS float64 `json:"starling_cpu_s"`
	ClientsCPUS  float64 `json:"clients_cpu_s"`
	CPUSPerGB    float64 `json:"cpu_s_per_gb"`
	// RegistryRequests are the requests the registry had during the pull
	// (from the barrier to the last pull's end), by kind.
	RegistryRequests RegistryRequests `json:"registry_requests"`
	// Blobs is how many blobs the image has (config and layers).
	Blobs int `json:"blobs"`

	// Completions are the successful nodes' completion times in seconds,
	// sorted (for the CDF chart).
	Completions []float64 `json:"-"`
	// Agents is the sum of the agents' byte counters at the end (p2p).
	Agents agentBytes `json:"-"`
	// Setup is the time from the mode's start to the barrier.
	Setup time.Duration `json:"-"`
	// Pull is the time from the barrier to the last pull's end.
	Pull time.Duration `json:"-"`
	// CPU used during the pull by the agents, the supernode and this
	// process (the clients).
	AgentsCPU, SupernodeCPU, ClientsCPU time.Duration `json:"-"`
}

// Percentiles of completion times in seconds.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func (c *Config) validate() error {
	switch {
	case c.Nodes < 1:
		return fmt.Errorf("-nodes %d: want at least 1", c.Nodes)
	case c.Size < 1:
		return fmt.Errorf("-size %d: want at least 1 byte", c.Size)
	case c.Layers < 1:
		return fmt.Errorf("-layers %d: want at least 1", c.Layers)
	case c.PieceSize < 1:
		return fmt.Errorf("-piece-size %d: want at least 1 byte", c.PieceSize)
	case c.Repo == "":
		return errors.New("no repository to push the image to")
	case c.AgentBW < 0 || c.SeedBW < 0 || c.RegistryBW < 0:
		return errors.New("bandwidths must not be negative")
	case len(c.Modes) == 0:
		return errors.New("no mode to run")
	case c.Timeout <= 0:
		return errors.New("timeout must be positive")
	}
	for _, m := range c.Modes {
		if m != modeP2P && m != modeDirect {
			return fmt.Errorf("unknown mode %q", m)
		}
	}
	return nil
}

// run builds what it needs, then runs each mode from a fresh registry and
// fresh processes. Everything it starts is stopped, and its work dir
// removed, before it returns, also on error and when ctx is cancelled.
// A failed or unverified pull makes it return an error alongside the
// figures measured so far.
func run(ctx context.Context, cfg Config) (res Result, err error) {
	if err := cfg.validate(); err != nil {
		return res, err
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "info"
	}
	out := cfg.Out
	if out == nil {
		out = io.Discard
	}
	dir, err := os.MkdirTemp("", "pullstorm-")
	if err != nil {
		return res, fmt.Errorf("create work dir: %w", err)
	}
	res.WorkDir = dir
	defer func() {
		if cfg.Keep {
			fmt.Fprintf(out, "work dir kept: %s\n", dir)
			return
		}
		if rerr := os.RemoveAll(dir); rerr != nil {
			err = errors.Join(err, fmt.Errorf("remove work dir: %w", rerr))
		}
	}()

	bin := cfg.StarlingBin
	if bin == "" && slices.Contains(cfg.Modes, modeP2P) {
		root := cfg.ModuleRoot
		if root == "" {
			if root, err = findModuleRoot(); err != nil {
				return res, err
			}
		}
		fmt.Fprintf(out, "building starling (race=%v)...\n", cfg.Race)
		if bin, err = buildStarling(ctx, root, dir, cfg.Race); err != nil {
			return res, err
		}
	}

	start := time.Now()
	img, err := makeImage(cfg.Size, cfg.Layers)
	if err != nil {
		return res, err
	}
	fmt.Fprintf(out, "image: %d layers, %s of blobs (%s), generated in %v\n",
		cfg.Layers, fmtBytes(img.blobBytes), img.manifestDigest, time.Since(start).Round(time.Millisecond))

	tag, err := randomTag()
	if err != nil {
		return res, err
	}
	for _, mode := range cfg.Modes {
		r, pids, err := runMode(ctx, cfg, mode, bin, dir, img, tag, out)
		res.PIDs = append(res.PIDs, pids...)
		if r != nil {
			res.Runs = append(res.Runs, *r)
		}
		if err != nil {
			return res, fmt.Errorf("%s mode: %w", mode, err)
		}
	}
	return res, nil
}

// runMode runs one mode: fresh registry, push, (p2p: supernode and agents),
// then every node pulls at the same instant.
func runMode(ctx context.Context, cfg Config, mode, bin, workDir string, img *testImage, tag string, out io.Writer) (res *RunResult, pids []int, err error) {
	setupStart := time.Now()
	dir := filepath.Join(workDir, mode)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("mode dir: %w", err)
	}

	up, err := startUpstream(cfg.Registry, cfg.RegistryBW)
	if err != nil {
		return nil, nil, err
	}
	defer func() { err = errors.Join(err, up.Close()) }()
	pushOpts := []remote.Option{remote.WithContext(ctx)}
	if cfg.Registry != "" {
		pushOpts = append(pushOpts, remote.WithAuthFromKeychain(authn.DefaultKeychain))
	}
	if _, err := img.push(up.pushURL, cfg.Repo, tag, pushOpts...); err != nil {
		return nil, nil, err
	}
	up.egress.bytes.Store(0) // the push's HEADs and pings are not pull egress

	procs := &procSet{}
	defer func() {
		for _, c := range procs.all() {
			pids = append(pids, c.pid())
		}
		err = errors.Join(err, procs.stopAll())
	}()
	regDesc := up.URL()
	if cfg.Registry != "" {
		regDesc += " (counting proxy to " + cfg.Registry + ")"
	}
	var sw *swarm
	if mode == modeP2P {
		key := filepath.Join(dir, "swarm.key")
		if err := makeSwarmKey(ctx, bin, key); err != nil {
			return nil, nil, err
		}
		fmt.Fprintf(out, "[%s] registry %s; starting a supernode and %d agents\n", mode, regDesc, cfg.Nodes)
		sw, err = startSwarm(ctx, swarmSpec{
			bin: bin, dir: dir, swarmKey: key, registryURL: up.URL(), nodes: cfg.Nodes,
			pieceSize: cfg.PieceSize, agentBW: cfg.AgentBW, seedBW: cfg.SeedBW, logLevel: cfg.LogLevel,
		}, procs)
		if err != nil {
			return nil, nil, err
		}
	} else {
		fmt.Fprintf(out, "[%s] registry %s; %d nodes pull from it directly\n", mode, regDesc, cfg.Nodes)
	}

	tr := &http.Transport{
		Proxy:               nil,                            // loopback only; ignore HTTP_PROXY
		MaxIdleConnsPerHost: cfg.Nodes * maxConcurrentBlobs, // direct: every node on one host
		DisableCompression:  true,
		IdleConnTimeout:     30 * time.Second,
	}
	defer tr.CloseIdleConnections()

	pctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	var (
		moved     atomic.Int64
		done      atomic.Int64
		barrier   = make(chan struct{})
		t0        time.Time
		wg        sync.WaitGroup
		durations = make([]time.Duration, cfg.Nodes)
		errs      = make([]error, cfg.Nodes)
	)
	for i := range cfg.Nodes {
		spec := pullSpec{registryURL: up.URL(), repo: cfg.Repo, tag: tag, want: img}
		var base http.RoundTripper = tr
		if mode == modeP2P {
			spec.registryURL = sw.mirrors[i]
		} else {
			base = &pacedTransport{base: tr, limit: ratelimit.New(cfg.AgentBW)}
		}
		wg.Go(func() {
			<-barrier
			errs[i] = pullImage(pctx, spec, base, &moved)
			durations[i] = time.Since(t0)
			done.Add(1)
		})
	}

	prog := &progress{
		out: out, live: cfg.Live, mode: mode, nodes: cfg.Nodes, total: int64(cfg.Nodes) * img.blobBytes,
		done: &done, moved: &moved, egress: up.EgressBytes,
	}
	if sw != nil {
		prog.mirrors = sw.mirrors
	}
	setup := time.Since(setupStart)
	var agentsCPU0, supernodeCPU0 time.Duration
	if sw != nil {
		if agentsCPU0, err = sw.agentsCPU(); err != nil {
			return nil, nil, err
		}
		if supernodeCPU0, err = sw.supernode.cpuTime(); err != nil {
			return nil, nil, sw.supernode.failure(err)
		}
	}
	cpu0 := selfCPU()
	up.ResetRequests() // setup (start-up checks, the push) is not the rollout
	t0 = time.Now()
	close(barrier)
	stopProgress := prog.start(t0)
	wg.Wait()
	pull := time.Since(t0)
	clientsCPU := selfCPU() - cpu0
	stopProgress()

	r := &RunResult{
		Mode: mode, Nodes: cfg.Nodes, ImageBytes: img.blobBytes,
		RegistryEgressBytes: up.EgressBytes(), Setup: setup, Pull: pull, ClientsCPU: clientsCPU,
		RegistryRequests: up.Requests(), Blobs: len(img.blobs),
	}
	r.EgressRatio = float64(r.RegistryEgressBytes) / float64(r.ImageBytes)
	var firstErr error
	firstFailed := -1
	for i, e := range errs {
		if e != nil {
			r.FailedPulls++
			if firstErr == nil {
				firstErr, firstFailed = e, i
			}
			continue
		}
		r.Completions = append(r.Completions, durations[i].Seconds())
	}
	slices.Sort(r.Completions)
	r.CompletionS = percentiles(r.Completions)
	r.TMinS = tMin(mode, cfg.Nodes, float64(img.blobBytes), cfg.AgentBW, cfg.SeedBW, cfg.RegistryBW)
	if r.TMinS > 0 && r.FailedPulls == 0 {
		r.RatioToTMin = r.CompletionS.Max / r.TMinS
	}
	var failures []error
	shown := 0
	for i, e := range errs {
		if e != nil && i != firstFailed && shown < 10 {
			fmt.Fprintf(out, "[%s] node %d failed: %v\n", mode, i, e)
			shown++
		}
	}
	if firstErr != nil {
		err := fmt.Errorf("%d of %d pulls failed; node %d: %w", r.FailedPulls, cfg.Nodes, firstFailed, firstErr)
		if sw != nil {
			err = fmt.Errorf("%w%s%s", err, sw.agents[firstFailed].logTail(), sw.supernode.logTail())
		}
		failures = append(failures, err)
	}
	if sw != nil {
		r.Agents = scrapeAll(context.WithoutCancel(ctx), sw.mirrors)
		for i, a := range sw.agents {
			rss, err := a.peakRSS()
			if err != nil {
				// A dead agent has no /proc entry: a failure in itself.
				if i == firstFailed {
					failures = append(failures, fmt.Errorf("%s: %w", a.name, err)) // log shown above
				} else {
					failures = append(failures, a.failure(err))
				}
				continue
			}
			r.AgentMaxRSSBytes = max(r.AgentMaxRSSBytes, rss)
		}
		if cpu, err := sw.agentsCPU(); err == nil {
			r.AgentsCPU = cpu - agentsCPU0
		} else {
			failures = append(failures, err)
		}
		if cpu, err := sw.supernode.cpuTime(); err == nil {
			r.SupernodeCPU = cpu - supernodeCPU0
		} else {
			failures = append(failures, sw.supernode.failure(err))
		}
	}
	r.StarlingCPUS = (r.AgentsCPU + r.SupernodeCPU).Seconds()
	r.ClientsCPUS = r.ClientsCPU.Seconds()
	if delivered := float64(r.Nodes) * float64(r.ImageBytes) / 1e9; delivered > 0 {
		r.CPUSPerGB = r.StarlingCPUS / delivered
	}
	if ctx.Err() != nil {
		return r, nil, fmt.Errorf("interrupted: %w", context.Cause(ctx))
	}
	return r, nil, errors.Join(failures...)
}

// selfCPU is the user plus system CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// randomTag names the pushed image uniquely, so runs against a shared
// external registry do not collide.
func randomTag() (string, error) {
	var b [6]byte
	if _, err := crand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random tag: %w", err)
	}
	return "pullstorm-" + hex.EncodeToString(b[:]), nil
}
