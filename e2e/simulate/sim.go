package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/agent/swarm"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/rendezvous"
	"github.com/starling-oci/starling/supernode/tracker"
)

// Config is one simulated storm.
type Config struct {
	Nodes      int
	Size       int64 // image payload, split evenly over Layers blobs
	Layers     int
	PieceSize  int64
	AgentBW    int64 // each agent's upload and download (bytes/s; 0 = unlimited)
	SeedBW     int64 // each supernode's upload
	RegistryBW int64 // the registry's egress
	Latency    time.Duration
	Supernodes int
	Cores      int // CPU cores of each supernode for the tracker
	// TrackerCost is the CPU charged per tracker call: 0 measures the real
	// call's time; a positive value charges that instead (deterministic).
	TrackerCost time.Duration
	Churn       float64 // fraction of agents that leave mid-storm
	Slow        float64 // fraction of agents with SlowBW links
	SlowBW      int64
	Seed        uint64
	// Agent settings, as the agent's defaults.
	MaxInflight, PerPeer, AgentUploads, SeedUploads int
	StallTimeout                                    time.Duration
	// ClientBlobs is how many blobs a client pulls at once (containerd: 3).
	ClientBlobs int
	// Prefetch: the agent starts every layer's fill when the client pulls
	// the manifest (the agent's -prefetch, on by default), not when the
	// client asks for the blob.
	Prefetch bool
	// HaveInAnswers: piece answers carry the server's current bitmap.
	HaveInAnswers bool
	// Watch is how many peers each download watches (0: none).
	Watch int
	// TrackerBlobRate and TrackerTotalRate override the tracker's request
	// rate targets (0: its defaults).
	TrackerBlobRate, TrackerTotalRate float64
	// HostCores and HostCPUPerGB model every node sharing one machine (the
	// loopback pull storm): piece bytes cost HostCPUPerGB CPU-seconds per
	// GB moved, and the machine has HostCores cores (0: not modelled).
	HostCores    int
	HostCPUPerGB float64
	// Limit bounds the virtual time.
	Limit time.Duration
	// Manifests: tag resolution before the pull (manifests.go).
	Manifests ManifestConfig
	// Timeline: sample the swarm every 250 ms of virtual time (Result.Timeline).
	Timeline bool
	// Progress, if set, is called about every second of wall time.
	Progress func(p Progress)
}

// Progress is the state of a run for the progress line.
type Progress struct {
	Virtual       time.Duration
	Done, Running int
	Events        uint64
	Requests      int64
	Registry      RegistryRequests
	Wall          time.Duration
}

type blob struct {
	idx      int
	digest   string
	size     int64
	count    int
	cids     []cid.Cid
	owner    *supernode
	fetching int // agents fetching it from the registry now
}

// sim is the simulated world.
type sim struct {
	cfg   Config
	now   int64 // virtual nanoseconds since the start
	base  time.Time
	ev    events
	seq   uint64
	count uint64 // events run
	rng   *rand.Rand
	stop  <-chan struct{}

	blobs    []*blob
	agents   []*agent
	sns      []*supernode
	byID     map[peer.ID]*node
	registry *port
	mf       *manifestSim // tag resolution and the registry's request counts
	host     *port        // the machine's CPU, when every node runs on one (-host-cores)
	zero     []byte
	asks     []ask // scratch for fill
	// Scratch for changed.
	gen     uint64
	work    []portRef
	touched []*flow
	moved   []*flow

	outcomes        [swarm.Failed + 1]int64
	watches         WatchCounts
	timeline        []Sample
	trackerRequests int64
	trackerCPU      time.Duration
	fallbacks       int
	maxFetching     int // most agents fetching one blob from the registry at once
	left            int
	done            int
}

func (s *sim) after(d int64, fn func()) {
	s.seq++
	s.ev.push(event{at: s.now + d, seq: s.seq, fn: fn})
}

func (s *sim) vnow() time.Time { return s.base.Add(time.Duration(s.now)) }

func (s *sim) latency() int64 { return int64(s.cfg.Latency) }

// node is anything that serves pieces: an agent or a supernode.
type node struct {
	idx      int
	id       peer.ID
	ip       netip.Addr
	addrs    []string
	up, down *port
	slots    int
	busy     int
	queue    []*pieceReq
	meter    pieceserver.Meter // the piece server's (no --upload-rate: it learns the link's peak)
	dead     bool
	has      func(b *blob, i int) bool
	bitmap   func(b *blob) []byte // nil for supernodes
	agent    *agent               // nil for supernodes
}

func newID(rng *rand.Rand) (peer.ID, error) {
	var seed [32]byte
	for i := range seed {
		seed[i] = byte(rng.Uint32())
	}
	_, pub, err := crypto.GenerateEd25519Key(rand.NewChaCha8(seed))
	if err != nil {
		return "", fmt.Errorf("generate peer key: %w", err)
	}
	return peer.IDFromPublicKey(pub)
}

func newSim(cfg Config) (*sim, error) {
	s := &sim{cfg: cfg, base: time.Unix(1_800_000_000, 0), rng: rand.New(rand.NewPCG(cfg.Seed, 0x5eed)), byID: map[peer.ID]*node{}}
	s.registry = newPort(cfg.RegistryBW)
	if cfg.HostCores > 0 && cfg.HostCPUPerGB > 0 {
		s.host = &port{cap: float64(cfg.HostCores) / cfg.HostCPUPerGB * 1e9}
	}
	s.zero = make([]byte, cfg.PieceSize)

	var owners []string
	for k := range cfg.Supernodes {
		id, err := newID(s.rng)
		if err != nil {
			return nil, err
		}
		ip := netip.AddrFrom4([4]byte{10, 255, byte(k >> 8), byte(k)})
		n := &node{idx: -1 - k, id: id, ip: ip, addrs: []string{fmt.Sprintf("/ip4/%s/tcp/4001", ip)},
			up: newPort(cfg.SeedBW), down: newPort(0), slots: cfg.SeedUploads}
		sn := &supernode{s: s, n: n, cores: cfg.Cores}
		sn.state = tracker.NewState(tracker.Config{BlobRate: cfg.TrackerBlobRate, TotalRate: cfg.TrackerTotalRate}, id, n.addrs, rand.New(rand.NewPCG(cfg.Seed, uint64(1000+k))))
		n.has = sn.has
		s.sns = append(s.sns, sn)
		s.byID[id] = n
		owners = append(owners, id.String())
	}
	per := cfg.Size / int64(cfg.Layers)
	for k := range cfg.Layers {
		size := per
		if k == cfg.Layers-1 {
			size = cfg.Size - per*int64(cfg.Layers-1)
		}
		sum := sha256.Sum256(fmt.Appendf(nil, "simulated layer %d of seed %d", k, cfg.Seed))
		b := &blob{idx: k, digest: "sha256:" + hex.EncodeToString(sum[:]), size: size, count: piece.Count(size, cfg.PieceSize)}
		for i := range b.count {
			b.cids = append(b.cids, piece.CID(fmt.Appendf(nil, "%s/%d", b.digest, i)))
		}
		owner := rendezvous.Rank(b.digest, owners)[0]
		for _, sn := range s.sns {
			if sn.n.id.String() == owner {
				b.owner = sn
			}
		}
		s.blobs = append(s.blobs, b)
	}
	for _, sn := range s.sns {
		sn.seeds = make([]*seedState, len(s.blobs))
	}
	slow := int(cfg.Slow * float64(cfg.Nodes))
	for k := range cfg.Nodes {
		id, err := newID(s.rng)
		if err != nil {
			return nil, err
		}
		ip := netip.AddrFrom4([4]byte{10, byte(k >> 16), byte(k >> 8), byte(k)})
		bw := cfg.AgentBW
		if k < slow {
			bw = cfg.SlowBW
		}
		n := &node{idx: k, id: id, ip: ip, addrs: []string{fmt.Sprintf("/ip4/%s/tcp/4001", ip)},
			up: newPort(bw), down: newPort(bw), slots: cfg.AgentUploads}
		a := &agent{s: s, n: n, bufs: cfg.MaxInflight, pulls: make([]*pull, len(s.blobs)), done: -1}
		n.has, n.bitmap, n.agent = a.has, a.bitmap, a
		s.agents = append(s.agents, a)
		s.byID[id] = n
	}
	// Slow agents are the first ones; shuffle so they are not all early
	// in every ordering.
	s.rng.Shuffle(len(s.agents), func(i, j int) { s.agents[i], s.agents[j] = s.agents[j], s.agents[i] })
	s.mf = newManifestSim(s)
	return s, nil
}

// run plays the storm: every agent asks for the image at time 0.
func (s *sim) run() {
	for _, a := range s.agents {
		s.mf.pull(a, a.start) // the blobs once the manifest is known
	}
	if n := int(s.cfg.Churn * float64(len(s.agents))); n > 0 {
		// Leavers go at uniformly random moments of the storm's ideal length.
		tmin := s.tMin()
		for _, k := range s.rng.Perm(len(s.agents))[:n] {
			a := s.agents[k]
			s.after(int64(s.rng.Float64()*tmin*1e9), a.leave)
		}
	}
	if s.cfg.Timeline {
		s.startTimeline()
	}
	// One OS thread for the whole loop, so that thread CPU time measures
	// the tracker's calls.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	wallStart := time.Now()
	lastReport := wallStart
	limit := int64(s.cfg.Limit)
	for len(s.ev) > 0 && s.done+s.left < len(s.agents) {
		e := s.ev.pop()
		if e.at > limit {
			break
		}
		s.now = e.at
		s.count++
		e.fn()
		if s.count%4096 == 0 && s.interrupted() {
			return
		}
		if s.cfg.Progress != nil && s.count%4096 == 0 && time.Since(lastReport) >= time.Second {
			lastReport = time.Now()
			s.cfg.Progress(s.progress(wallStart))
		}
	}
	if s.cfg.Progress != nil {
		s.cfg.Progress(s.progress(wallStart))
	}
}

func (s *sim) interrupted() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

func (s *sim) progress(wallStart time.Time) Progress {
	return Progress{Virtual: time.Duration(s.now), Done: s.done, Running: len(s.agents) - s.done - s.left,
		Events: s.count, Requests: s.trackerRequests, Registry: s.mf.requests, Wall: time.Since(wallStart)}
}

// tMin is the Kumar–Ross minimum distribution time for the configured
// links (seconds), with the registry as a bound: the seed gets every byte
// from it once.
func (s *sim) tMin() float64 {
	f := float64(s.cfg.Size)
	t := 0.0
	var seedUp float64
	for _, sn := range s.sns {
		if sn.n.up.cap >= unlimited {
			seedUp = unlimited
			break
		}
		seedUp += sn.n.up.cap
	}
	sumUp, dMin := 0.0, unlimited
	for _, a := range s.agents {
		sumUp += a.n.up.cap
		dMin = min(dMin, a.n.down.cap)
	}
	t = max(t, f/seedUp, f/dMin, f/s.registry.cap)
	if seedUp < unlimited && sumUp < unlimited {
		t = max(t, float64(len(s.agents))*f/(seedUp+sumUp))
	}
	return t
}

// pieceReq is one piece fetch on its way.
type pieceReq struct {
	p      *pull
	gen    int
	f      swarm.Fetch
	server *node
	queued bool
	gone   bool // cancelled by the requester
	fl     *flow
}

// requestPiece sends a piece request; the outcome comes back to the pull.
func (s *sim) requestPiece(p *pull, f swarm.Fetch) {
	server := s.byID[f.From]
	r := &pieceReq{p: p, gen: p.gen, f: f, server: server}
	p.reqs = append(p.reqs, r)
	s.after(s.latency(), func() { s.arrive(r) })
}

func (s *sim) reply(r *pieceReq, out swarm.Outcome) {
	var have []byte
	if s.cfg.HaveInAnswers && !r.server.dead && r.server.bitmap != nil {
		have = r.server.bitmap(r.p.b)
	}
	s.after(s.latency(), func() { r.p.result(r, out, have) })
}

func (s *sim) arrive(r *pieceReq) {
	if r.gone {
		return
	}
	n := r.server
	if n.dead {
		s.reply(r, swarm.Failed) // connection refused
		return
	}
	underused := n.busy >= n.slots && n.meter.Underused(s.vnow(), int64(s.sent(n.up)))
	switch pieceserver.Admit(n.slots, n.busy, s.queued(n), underused) {
	case pieceserver.Serve:
		if n.busy >= n.slots {
			n.meter.Took()
		}
		s.serve(r)
		return
	case pieceserver.Refuse:
		s.reply(r, swarm.Busy)
		return
	}
	r.queued = true
	n.queue = append(n.queue, r)
	s.after(int64(pieceserver.QueueWait), func() {
		if r.queued {
			r.queued = false
			if !r.gone {
				s.reply(r, swarm.Busy)
			}
		}
	})
}

func (s *sim) serve(r *pieceReq) {
	n := r.server
	b := r.p.b
	if !n.has(b, r.f.Piece) {
		s.reply(r, swarm.Unavailable)
		return
	}
	n.busy++
	_, length := piece.Bounds(r.f.Piece, b.size, s.cfg.PieceSize)
	r.fl = s.startFlow(n.up, r.p.a.n.down, length, func() {
		s.freeSlot(n)
		s.reply(r, swarm.Got)
	}, func() {
		s.freeSlot(n)
		if !r.gone {
			s.reply(r, swarm.Failed) // the server died mid-piece
		}
	})
}

// queued counts the requests waiting for one of n's upload slots.
func (s *sim) queued(n *node) int {
	k := 0
	for _, r := range n.queue {
		if r != nil && r.queued && !r.gone {
			k++
		}
	}
	return k
}

func (s *sim) freeSlot(n *node) {
	n.busy--
	if n.dead {
		return
	}
	for len(n.queue) > 0 && n.busy < n.slots {
		r := n.queue[0]
		n.queue[0] = nil
		n.queue = n.queue[1:]
		if !r.queued || r.gone {
			continue
		}
		r.queued = false
		s.serve(r)
	}
}
