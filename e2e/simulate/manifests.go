package main

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"time"

	agentmanifests "github.com/starling-oci/starling/agent/manifests"
	"github.com/starling-oci/starling/e2e/internal/regreq"
	"github.com/starling-oci/starling/supernode/manifests"
)

// Manifests: every pull starts as containerd's does through an agent. It
// HEADs the tag; the agent asks the supernode that owns the tag
// (agent/manifests.Owners, the real client's order) and keeps the answer,
// so containerd's GET of the manifest by digest that follows is answered
// from the agent's cache (the supernode's answer granted it). The
// supernode runs the real manifests.Policy: tag TTL, one upstream request
// for all concurrent askers, the content-addressed cache. The registry
// counts its requests by kind as the pull storm's does (e2e/pullstorm's
// registry_requests), the seed's and fallbacks' blob GETs included. Only
// then does the client ask for the blobs.

// ManifestConfig is the manifest side of a storm.
type ManifestConfig struct {
	// TagTTL is the supernode's --tag-ttl.
	TagTTL time.Duration
	// RegistryLatency is the registry's round trip for one request.
	RegistryLatency time.Duration
	// TagMoveAt, when positive, moves the tag upstream to another
	// manifest (naming the same blobs) at that virtual time.
	TagMoveAt time.Duration
	// RepullAt, when positive, has every agent still up resolve the tag
	// again at that virtual time (a rollout of the moved tag).
	RepullAt time.Duration
}

func addManifestFlags(fs *flag.FlagSet, c *ManifestConfig) {
	fs.DurationVar(&c.TagTTL, "tag-ttl", c.TagTTL, "supernode: how long a tag's resolution answers every agent (--tag-ttl)")
	fs.DurationVar(&c.RegistryLatency, "registry-latency", c.RegistryLatency, "the registry's round trip for one manifest or blob request")
	fs.DurationVar(&c.TagMoveAt, "tag-move-at", 0, "move the tag upstream to a new manifest at this virtual time (0: never)")
	fs.DurationVar(&c.RepullAt, "repull-at", 0, "every agent still up resolves the tag again at this virtual time (0: never)")
}

// RegistryRequests counts the requests the simulated registry had, by
// kind, exactly as e2e/pullstorm counts the real one's.
type RegistryRequests = regreq.Counts

// ManifestStats are the manifest side's results.
type ManifestStats struct {
	// Requests are the manifest requests agents sent to supernodes.
	Requests int64   `json:"requests"`
	CPUS     float64 `json:"cpu_s"`
	// ResolvedS is when the last agent had the image's manifest.
	ResolvedS float64 `json:"resolved_s"`
	// Digests counts the agents still up by the manifest digest they
	// last resolved the tag to (more than one only when the tag moved).
	Digests map[string]int `json:"digests"`
	// OldAfterMoveS is, for the tag moved upstream (-tag-move-at), how
	// long after the move the last request that was answered the old
	// digest reached its supernode: at most --tag-ttl plus one upstream
	// exchange. -1 when none was.
	OldAfterMoveS float64 `json:"old_after_move_s,omitempty"`
}

const (
	simRegistry = "registry.sim"
	simRepo     = "sim/image"
	simTag      = "latest"
)

// manifestSim is the registry's tags, the supernodes' manifest services
// and the counts.
type manifestSim struct {
	s      *sim
	owners []string
	bySN   map[string]*snManifests
	digest string // what the tag names upstream now
	moved  int64  // virtual time the tag moved, -1 if it has not
	// upstreams holds the upstream clients (a supernode's, or an agent's
	// when it falls back) that have pinged the registry: one /v2/ ping each.
	upstreams map[any]bool

	requests RegistryRequests
	stats    ManifestStats
	cpu      time.Duration
	digestOf []string // per agent index: the digest it resolved
}

// snManifests is one supernode's manifest service: the real Policy, the
// content-addressed cache, and the flights' waiters.
type snManifests struct {
	pol   *manifests.Policy
	cache map[string]bool
}

func manifestDigest(n int) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "simulated manifest %d", n))
	return "sha256:" + hex.EncodeToString(sum[:])
}

func newManifestSim(s *sim) *manifestSim {
	m := &manifestSim{s: s, bySN: map[string]*snManifests{}, digest: manifestDigest(0), moved: -1,
		upstreams: map[any]bool{}, digestOf: make([]string, len(s.agents))}
	for _, sn := range s.sns {
		id := sn.n.id.String()
		m.owners = append(m.owners, id)
		// --auth-ttl's default: anonymous pulls are granted for 5 minutes.
		m.bySN[id] = &snManifests{pol: manifests.NewPolicy(s.cfg.Manifests.TagTTL, 5*time.Minute), cache: map[string]bool{}}
	}
	if at := s.cfg.Manifests.TagMoveAt; at > 0 {
		m.stats.OldAfterMoveS = -1
		s.after(int64(at), func() { m.digest = manifestDigest(1); m.moved = s.now })
	}
	if at := s.cfg.Manifests.RepullAt; at > 0 {
		s.after(int64(at), func() {
			for _, a := range s.agents {
				if !a.n.dead {
					m.pull(a, func() {})
				}
			}
		})
	}
	return m
}

// upstream counts a request from client (a supernode or an agent) to the
// registry and returns its round trip: the first one of each client also
// pays the token flow's ping.
func (m *manifestSim) upstream(client any, count *int64) int64 {
	*count++
	rtt := int64(m.s.cfg.Manifests.RegistryLatency)
	if !m.upstreams[client] {
		m.upstreams[client] = true
		m.requests.Other++
		rtt *= 2
	}
	return rtt
}

// blobGet counts a blob GET by the seed of sn (or by agent a falling
// back, when sn is nil).
func (m *manifestSim) blobGet(client any) {
	m.upstream(client, &m.requests.BlobGet)
}

// pull resolves the image's tag for agent a, as containerd through the
// agent does, and calls then once a has the manifest.
func (m *manifestSim) pull(a *agent, then func()) {
	s := m.s
	req := manifests.Request{Registry: simRegistry, Repo: simRepo, Ref: simTag}
	// The owner first; supernodes do not fail in the simulator, so the
	// rest of the order (and the agent's direct fallback) is never used.
	sn := m.bySN[agentmanifests.Owners(req.Registry, req.Repo, req.Ref, m.owners)[0]]
	node := m.supernode(sn)
	m.stats.Requests++
	s.after(s.latency(), func() {
		node.submit(func() time.Duration {
			arrival := s.now
			var d manifests.Decision
			cost := m.measure(func() { d = sn.pol.Decide(s.vnow(), req, sn.has) })
			m.act(sn, node, req, d, func(digest string) {
				if m.moved >= 0 && arrival >= m.moved && digest != m.digest {
					m.stats.OldAfterMoveS = max(m.stats.OldAfterMoveS, time.Duration(arrival-m.moved).Seconds())
				}
				s.after(int64(cost)+s.latency(), func() {
					if a.n.dead {
						return
					}
					m.digestOf[a.n.idx] = digest
					m.stats.ResolvedS = max(m.stats.ResolvedS, time.Duration(s.now).Seconds())
					// containerd's GET by digest is the agent's cache hit.
					then()
				})
			})
			return cost
		})
	})
}

func (sn *snManifests) has(d string) bool { return sn.cache[d] }

func (m *manifestSim) supernode(sn *snManifests) *supernode {
	for _, x := range m.s.sns {
		if m.bySN[x.n.id.String()] == sn {
			return x
		}
	}
	panic("manifest owner is not a supernode")
}

// measure runs a policy call and returns its CPU charge (the measured
// time, or the fixed -tracker-cost for deterministic runs).
func (m *manifestSim) measure(call func()) time.Duration {
	t0 := threadCPU()
	call()
	d := threadCPU() - t0
	m.cpu += d
	if m.s.cfg.TrackerCost > 0 {
		return m.s.cfg.TrackerCost
	}
	return d
}

// flight is a Policy flight's waiters.
type flight struct{ waiters []func(digest string) }

// act carries out a decision: answer, wait, or go upstream and then hand
// the outcome to the flight's waiters.
func (m *manifestSim) act(sn *snManifests, node *supernode, req manifests.Request, d manifests.Decision, answer func(string)) {
	s := m.s
	switch d.Action {
	case manifests.Cached:
		answer(d.Digest)
	case manifests.Wait:
		f := d.Flight.Data.(*flight)
		f.waiters = append(f.waiters, answer)
	case manifests.HeadTag:
		d.Flight.Data = &flight{waiters: []func(string){answer}}
		rtt := m.upstream(node, &m.requests.ManifestHead)
		s.after(rtt, func() {
			digest := m.digest // what upstream names at the HEAD's arrival
			h := sn.pol.Headed(s.vnow(), req, digest, sn.has)
			m.act(sn, node, req, h, func(digest string) {
				sn.pol.Resolved(s.vnow(), req, digest)
				m.land(sn, d.Flight, digest)
			})
		})
	case manifests.Get:
		if d.Flight == nil {
			panic("simulated registry names a digest for every tag")
		}
		d.Flight.Data = &flight{waiters: []func(string){answer}}
		rtt := m.upstream(node, &m.requests.ManifestGet)
		s.after(rtt, func() {
			sn.cache[d.Digest] = true
			if req.IsDigest() {
				sn.pol.Granted(s.vnow(), req.Registry, req.Repo, d.Digest, req.Cred)
			}
			m.land(sn, d.Flight, d.Digest)
		})
	case manifests.HeadDigest:
		d.Flight.Data = &flight{waiters: []func(string){answer}}
		rtt := m.upstream(node, &m.requests.ManifestHead)
		s.after(rtt, func() {
			sn.pol.Granted(s.vnow(), req.Registry, req.Repo, d.Digest, req.Cred)
			m.land(sn, d.Flight, d.Digest)
		})
	}
}

// land ends a flight and answers its waiters.
func (m *manifestSim) land(sn *snManifests, f *manifests.Flight, digest string) {
	sn.pol.End(f)
	for _, w := range f.Data.(*flight).waiters {
		w(digest)
	}
}

// result fills the run's manifest figures.
func (m *manifestSim) result() (RegistryRequests, ManifestStats) {
	st := m.stats
	st.CPUS = m.cpu.Seconds()
	st.Digests = map[string]int{}
	for _, a := range m.s.agents {
		if d := m.digestOf[a.n.idx]; d != "" && !a.n.dead {
			st.Digests[d]++
		}
	}
	return m.requests, st
}

func printManifests(w io.Writer, r RegistryRequests, st ManifestStats) {
	fmt.Fprintf(w, "registry requests: %s\n", r)
	fmt.Fprintf(w, "manifests: %d requests to supernodes, %.3f CPU-s, last agent resolved at %.3f s, digests %v\n",
		st.Requests, st.CPUS, st.ResolvedS, st.Digests)
}
