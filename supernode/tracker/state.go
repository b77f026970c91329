package tracker

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// Config tunes the tracker's policy. Zero fields take the defaults noted.
type Config struct {
	// MaxPeers bounds the peers handed to one asker (16).
	MaxPeers int
	// SeedOffer is how many of the seed's pieces one asker is shown at a
	// time, super-seeding (8).
	SeedOffer int
	// PeerTTL drops peers not heard from for this long (10 min).
	PeerTTL time.Duration
	// MinInterval and MaxInterval bound the server-driven interval between
	// an agent's requests for one blob (100 ms, 10 s).
	MinInterval, MaxInterval time.Duration
	// BlobRate and TotalRate are the request rates (per second) the
	// interval aims at, per blob and over all blobs (6000, 24000): the
	// interval is the larger of members/BlobRate and all members/TotalRate.
	// At ~16 µs a request (the simulator's measure of this code) that is
	// under half a core; piece CIDs reach agents only through the tracker,
	// so the interval is how late an agent learns of a new piece.
	BlobRate, TotalRate float64
	// Permits is how many agents may fetch one blob from upstream at once
	// (2), each for a lease of PermitLease (1 min, renewable).
	Permits     int
	PermitLease time.Duration
	// PermitQuiet: a permit is granted only when no member and not the
	// seed gained a piece of the blob for this long (10 s): a swarm that
	// progresses, however slowly, will reach the asker. PermitWait bounds
	// that rule (2 min): an asker refused for so long, without gaining a
	// piece meanwhile, gets a free permit.
	PermitQuiet, PermitWait time.Duration
	// MaxBlobs bounds the swarms held (4096), MaxBlobsPerPeer the swarms
	// one peer is in (512), MaxPeersPerBlob the members of one (65536).
	MaxBlobs, MaxBlobsPerPeer, MaxPeersPerBlob int
	// SeedBurst and SeedRefill limit how many new swarms (each one an
	// upstream fetch by the seed) one peer may start: a burst of SeedBurst
	// (64), then one per SeedRefill (1 s).
	SeedBurst  int
	SeedRefill time.Duration
}

func (c *Config) defaults() {
	if c.MaxPeers <= 0 || c.MaxPeers > swarmproto.MaxPeers {
		c.MaxPeers = 16
	}
	if c.SeedOffer <= 0 {
		c.SeedOffer = 8
	}
	if c.PeerTTL <= 0 {
		c.PeerTTL = 10 * time.Minute
	}
	if c.MinInterval <= 0 {
		c.MinInterval = 100 * time.Millisecond
	}
	if c.MaxInterval < c.MinInterval {
		c.MaxInterval = max(c.MinInterval, 10*time.Second)
	}
	if c.BlobRate <= 0 {
		c.BlobRate = 6000
	}
	if c.TotalRate <= 0 {
		c.TotalRate = 24000
	}
	if c.Permits <= 0 {
		c.Permits = 2
	}
	if c.PermitLease <= 0 {
		c.PermitLease = time.Minute
	}
	if c.PermitQuiet <= 0 {
		c.PermitQuiet = 10 * time.Second
	}
	if c.PermitWait <= 0 {
		c.PermitWait = 2 * time.Minute
	}
	if c.MaxBlobs <= 0 {
		c.MaxBlobs = 4096
	}
	if c.MaxBlobsPerPeer <= 0 {
		c.MaxBlobsPerPeer = 512
	}
	if c.MaxPeersPerBlob <= 0 {
		c.MaxPeersPerBlob = 1 << 16
	}
	if c.SeedBurst <= 0 {
		c.SeedBurst = 64
	}
	if c.SeedRefill <= 0 {
		c.SeedRefill = time.Second
	}
}

// Asker is the sender of a request as the driver saw it.
type Asker struct {
	ID peer.ID
	// IP is the address the request's connection came from. Announced
	// addresses are rewritten to it, and loopback peers are handed only to
	// loopback askers. An invalid IP (an in-process caller with no network)
	// keeps announced addresses as they are.
	IP netip.Addr
}

// Result is State.Handle's decision.
type Result struct {
	Resp *swarmproto.TrackerResponse
	// Seed asks the caller to start the seed for the request (outside any
	// lock): the blob's swarm is new or its last fetch failed.
	Seed bool
}

// State is the tracker's policy for every blob: piece tables, members and
// their bitmaps, super-seeding offers and back-to-source permits. It has no
// host, no clock and no global randomness: time comes in as now and
// randomness from the injected source. Every method returns at once; one
// request costs O(answer + pieces), never O(members).
type State struct {
	cfg       Config
	selfID    string
	selfAddrs []string // non-loopback, handed to everyone
	selfLoop  []string // loopback, handed to loopback askers only

	version  atomic.Uint64 // one counter for all blobs: a recreated swarm never goes back
	members  atomic.Int64  // memberships over all blobs, for the interval
	complete atomic.Int64  // of which hold the whole blob
	pressure atomic.Int64  // requests being answered at once, from the driver

	mu    sync.Mutex // guards blobs, rng and swept; taken before a swarm's mu
	rng   *rand.Rand
	blobs map[string]*swarm
	swept time.Time

	peersMu sync.Mutex // leaf lock: perPeer
	perPeer map[peer.ID]*peerBudget
}

// peerBudget is what one peer holds across blobs.
type peerBudget struct {
	blobs  int       // swarms it is a member of
	tokens float64   // new swarms it may start now
	filled time.Time // when tokens was last topped up
}

type swarm struct {
	mu     sync.Mutex
	rng    *rand.Rand
	dead   bool // removed from State.blobs; callers look it up again
	digest string

	version   uint64
	touched   time.Time // last change, for pruning idle swarms
	size      int64     // -1 until the seed knows it
	pieceSize int64
	n         int // piece count once size is known
	pieces    []string
	seedHave  []byte
	seedCount int
	seedErr   string
	seedCode  int
	seeding   bool // a seed fetch was asked for and has not reported back

	members  []*member // members, for sampling
	complete int       // members holding every piece
	index    map[peer.ID]*member
	byStr    map[string]*member // by encoded ID, for failure reports
	holders  []*member          // members holding at least one piece
	held     []int32            // per piece: members holding it
	offered  [][]*member        // per piece: members it is on offer to
	permits  []lease
	denied   int       // permits refused, for the status API
	progress time.Time // last time a member or the seed gained a piece
}

type member struct {
	id       peer.ID
	idStr    string // encoded once, at join
	rawAddrs string // as last announced, to skip re-parsing
	addrs    []string
	loopback bool
	have     []byte
	count    int
	seen     time.Time
	offers   []int     // seed pieces on offer to it
	refused  time.Time // first permit refusal since its last grant or gain (zero: none)
	pos      int       // index in members
	hpos     int       // index in holders, -1 if none
	gone     bool
}

type lease struct {
	m     *member
	until time.Time
}

// NewState builds an empty tracker state. self is the supernode's own peer
// (the seed), selfAddrs its dialable addresses; rng is the only source of
// randomness.
func NewState(cfg Config, self peer.ID, selfAddrs []string, rng *rand.Rand) *State {
	cfg.defaults()
	s := &State{cfg: cfg, selfID: self.String(), rng: rng, blobs: map[string]*swarm{}, perPeer: map[peer.ID]*peerBudget{}}
	for _, a := range selfAddrs {
		if m, err := ma.NewMultiaddr(a); err == nil && isLoopback(m) {
			s.selfLoop = append(s.selfLoop, a)
		} else {
			s.selfAddrs = append(s.selfAddrs, a)
		}
	}
	return s
}

func isLoopback(m ma.Multiaddr) bool {
	if len(m) == 0 {
		return false
	}
	switch m[0].Protocol().Code {
	case ma.P_IP4, ma.P_IP6:
		ip, err := netip.ParseAddr(m[0].Value())
		return err == nil && ip.IsLoopback()
	}
	return false
}

// lookup returns the swarm of digest, creating it when create is set;
// callers hold nothing.
func (st *State) lookup(digest string, create bool, now time.Time) (*swarm, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.sweep(now)
	s, ok := st.blobs[digest]
	if ok || !create {
		return s, nil
	}
	if len(st.blobs) >= st.cfg.MaxBlobs {
		return nil, fmt.Errorf("tracker holds %d blobs, its limit", len(st.blobs))
	}
	s = &swarm{
		rng:    rand.New(rand.NewPCG(st.rng.Uint64(), st.rng.Uint64())),
		digest: digest, size: -1, touched: now, progress: now,
		index: map[peer.ID]*member{}, byStr: map[string]*member{},
	}
	s.version = st.version.Add(1)
	st.blobs[digest] = s
	return s, nil
}

// locked runs f on the swarm of digest with its lock held, retrying if the
// swarm was pruned in between. f sees nil when the swarm does not exist
// and create is false.
func (st *State) locked(digest string, create bool, now time.Time, f func(*swarm) error) error {
	for {
		s, err := st.lookup(digest, create, now)
		if err != nil {
			return err
		}
		if s == nil {
			return f(nil)
		}
		s.mu.Lock()
		if s.dead {
			s.mu.Unlock()
			continue
		}
		err = f(s)
		s.mu.Unlock()
		return err
	}
}

// sweep drops, at most once a minute, members not heard from for PeerTTL
// and then swarms nobody is in that have not changed for as long. Callers
// hold st.mu. Its cost (all members) is spread over a minute of requests.
func (st *State) sweep(now time.Time) {
	if now.Sub(st.swept) < time.Minute {
		return
	}
	st.swept = now
	for digest, s := range st.blobs {
		s.mu.Lock()
		for k := len(s.members) - 1; k >= 0; k-- {
			if m := s.members[k]; now.Sub(m.seen) > st.cfg.PeerTTL {
				st.remove(s, m)
			}
		}
		if len(s.members) == 0 && now.Sub(s.touched) > st.cfg.PeerTTL {
			s.dead = true
			delete(st.blobs, digest)
		}
		s.mu.Unlock()
	}
	st.peersMu.Lock()
	for id, b := range st.perPeer {
		if b.blobs == 0 && now.Sub(b.filled) > time.Duration(st.cfg.SeedBurst)*st.cfg.SeedRefill {
			delete(st.perPeer, id)
		}
	}
	st.peersMu.Unlock()
}

// budget returns id's budget; callers hold st.peersMu.
func (st *State) budget(id peer.ID, now time.Time) *peerBudget {
	b, ok := st.perPeer[id]
	if !ok {
		b = &peerBudget{tokens: float64(st.cfg.SeedBurst), filled: now}
		st.perPeer[id] = b
	}
	if now.After(b.filled) {
		b.tokens = min(float64(st.cfg.SeedBurst), b.tokens+float64(now.Sub(b.filled))/float64(st.cfg.SeedRefill))
		b.filled = now
	}
	return b
}

// takeSeedToken spends one of id's new-swarm tokens, if it may join
// another swarm at all.
func (st *State) takeSeedToken(id peer.ID, now time.Time) error {
	st.peersMu.Lock()
	defer st.peersMu.Unlock()
	b := st.budget(id, now)
	if b.blobs >= st.cfg.MaxBlobsPerPeer {
		return fmt.Errorf("peer %s is in %d blobs, the limit", id, b.blobs)
	}
	if b.tokens < 1 {
		return fmt.Errorf("peer %s starts new blobs too fast", id)
	}
	b.tokens--
	return nil
}

func (s *swarm) bump(st *State, now time.Time) {
	s.version = st.version.Add(1)
	s.touched = now
}

func refused(status int, interval time.Duration, format string, args ...any) *swarmproto.TrackerResponse {
	return &swarmproto.TrackerResponse{Error: fmt.Sprintf(format, args...), Status: status, Size: -1, Interval: interval.Milliseconds()}
}

// Handle answers one request at once.
func (st *State) Handle(now time.Time, from Asker, req *swarmproto.TrackerRequest) Result {
	if err := req.Validate(); err != nil {
		return Result{Resp: refused(http.StatusBadRequest, st.cfg.MaxInterval, "bad request: %v", err)}
	}
	create := req.Op == swarmproto.OpPoll
	var res Result
	err := st.locked(req.Digest, false, now, func(s *swarm) error {
		if s == nil {
			return nil
		}
		create = false
		res = st.handle(now, from, req, s)
		return nil
	})
	if err == nil && create {
		// Only a valid poll starts a swarm (and with it an upstream fetch),
		// and each peer only so many.
		if err := st.takeSeedToken(from.ID, now); err != nil {
			return Result{Resp: refused(http.StatusTooManyRequests, st.cfg.MaxInterval, "%v", err)}
		}
		err = st.locked(req.Digest, true, now, func(s *swarm) error {
			res = st.handle(now, from, req, s)
			return nil
		})
	}
	switch {
	case err != nil:
		return Result{Resp: refused(http.StatusServiceUnavailable, st.cfg.MaxInterval, "%v", err)}
	case res.Resp == nil:
		return Result{Resp: refused(http.StatusNotFound, st.cfg.MaxInterval, "blob %s is not being seeded here: poll it first", req.Digest)}
	}
	return res
}

// handle applies one request to swarm s; callers hold s.mu.
func (st *State) handle(now time.Time, from Asker, req *swarmproto.TrackerRequest, s *swarm) Result {
	m := s.index[from.ID]
	if req.Op == swarmproto.OpWithdraw {
		if m != nil {
			st.remove(s, m)
			s.bump(st, now)
		}
		return Result{Resp: &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize, Interval: st.interval(s, nil).Milliseconds()}}
	}
	if m == nil {
		var err error
		if m, err = st.join(s, from.ID, now); err != nil {
			return Result{Resp: refused(http.StatusTooManyRequests, st.cfg.MaxInterval, "%v", err)}
		}
	}
	m.seen = now
	if len(req.Addrs) > 0 {
		st.setAddrs(m, from, req.Addrs)
	}
	if req.Have != nil {
		st.setHave(s, m, req.Have, now)
	}
	var reported []int
	for _, f := range req.Failed {
		if st.failed(s, m, f, now) {
			reported = append(reported, f.Piece)
		}
	}
	switch req.Op {
	case swarmproto.OpPermit:
		return Result{Resp: st.permit(s, m, now)}
	case swarmproto.OpRelease:
		st.release(s, m)
		return Result{Resp: &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize, Interval: st.interval(s, m).Milliseconds()}}
	case swarmproto.OpHave:
		return Result{Resp: &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize, Interval: st.interval(s, m).Milliseconds()}}
	}
	// A poll.
	if s.seedErr != "" {
		resp := refused(s.seedCode, st.interval(s, m), "%s", s.seedErr)
		resp.Version = s.version
		// Reported once; the next poll starts a new attempt.
		s.seedErr, s.seedCode = "", 0
		return Result{Resp: resp}
	}
	// The seed starts for a blob of unknown size, and again for one it
	// no longer holds (evicted or quarantined on the supernode).
	seed := !s.seeding && (s.size < 0 || s.seedCount == 0)
	if seed {
		s.seeding = true
	}
	resp := &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize}
	if req.Known < len(s.pieces) {
		resp.Pieces = append([]string(nil), s.pieces[req.Known:]...)
	}
	if s.size >= 0 {
		if offer := st.seedOffer(s, m, req, reported, now); offer != nil {
			addrs := st.selfAddrs
			if !from.IP.IsValid() || from.IP.IsLoopback() {
				addrs = append(append([]string(nil), st.selfAddrs...), st.selfLoop...)
			}
			resp.Peers = append(resp.Peers, swarmproto.PeerInfo{ID: st.selfID, Addrs: addrs, Have: offer, Seed: true})
		}
		resp.Peers = st.sample(s, m, from, resp.Peers)
	}
	resp.Interval = st.interval(s, m).Milliseconds()
	return Result{Resp: resp, Seed: seed}
}

// join adds id to s, within the per-peer and per-blob bounds.
func (st *State) join(s *swarm, id peer.ID, now time.Time) (*member, error) {
	if len(s.members) >= st.cfg.MaxPeersPerBlob {
		return nil, fmt.Errorf("blob %s has %d peers, the limit", s.digest, len(s.members))
	}
	st.peersMu.Lock()
	b := st.budget(id, now)
	if b.blobs >= st.cfg.MaxBlobsPerPeer {
		st.peersMu.Unlock()
		return nil, fmt.Errorf("peer %s is in %d blobs, the limit", id, b.blobs)
	}
	b.blobs++
	st.peersMu.Unlock()
	m := &member{id: id, idStr: id.String(), pos: len(s.members), hpos: -1}
	s.members = append(s.members, m)
	s.index[id] = m
	s.byStr[m.idStr] = m
	st.members.Add(1)
	return m, nil
}

// remove drops m from s with its claims, offers and permit.
func (st *State) remove(s *swarm, m *member) {
	st.setBits(s, m, nil)
	for _, i := range m.offers {
		s.offered[i] = without(s.offered[i], m)
	}
	m.offers = nil
	st.release(s, m)
	last := s.members[len(s.members)-1]
	s.members[m.pos], last.pos = last, m.pos
	s.members = s.members[:len(s.members)-1]
	delete(s.index, m.id)
	delete(s.byStr, m.idStr)
	m.gone = true
	st.members.Add(-1)
	st.peersMu.Lock()
	if b, ok := st.perPeer[m.id]; ok {
		b.blobs--
	}
	st.peersMu.Unlock()
}

// setAddrs records the addresses m announced, moved onto the IP the
// request came from: a peer can only send others to itself.
func (st *State) setAddrs(m *member, from Asker, addrs []string) {
	raw := fmt.Sprint(addrs)
	if raw == m.rawAddrs {
		return
	}
	m.rawAddrs, m.addrs = raw, nil
	m.loopback = from.IP.IsValid() && from.IP.IsLoopback()
	seen := map[string]bool{}
	for _, a := range addrs {
		out, ok := observed(a, from.IP)
		if ok && !seen[out] {
			seen[out] = true
			m.addrs = append(m.addrs, out)
		}
	}
}

// observed rewrites addr's IP to ip (keeping transport and port).
func observed(addr string, ip netip.Addr) (string, bool) {
	m, err := ma.NewMultiaddr(addr)
	if err != nil || len(m) == 0 {
		return "", false
	}
	if !ip.IsValid() {
		return addr, true
	}
	code := m[0].Protocol().Code
	if code != ma.P_IP4 && code != ma.P_IP6 {
		return "", false // DNS names and the like: not an address we saw
	}
	proto := "ip4"
	ip = ip.Unmap()
	if ip.Is6() {
		proto = "ip6"
	}
	c, err := ma.NewComponent(proto, ip.String())
	if err != nil {
		return "", false
	}
	out := append(ma.Multiaddr{*c}, m[1:]...)
	return out.String(), true
}

// setHave replaces m's bitmap, keeping per-piece counts from the diff.
func (st *State) setHave(s *swarm, m *member, have []byte, now time.Time) {
	if s.n == 0 || len(have) != (s.n+7)/8 {
		return // no size yet, or not this blob's geometry
	}
	if rem := s.n % 8; rem != 0 && have[len(have)-1]&(0xff>>rem) != 0 {
		return // bits past the last piece
	}
	if st.setBits(s, m, have) {
		s.bump(st, now)
		s.progress = now
		// A member that gains pieces is slow, not stuck: its wait for a
		// permit (PermitWait) starts again at its next refusal.
		m.refused = time.Time{}
	}
	if m.count == s.n {
		st.release(s, m) // a complete member needs no permit
	}
}

// setBits makes m's bitmap have (nil: nothing), updating held, holders and
// dropping offers m no longer needs. It reports whether m gained a piece.
func (st *State) setBits(s *swarm, m *member, have []byte) bool {
	gained := false
	for k := range max(len(have), len(m.have)) {
		var old, cur byte
		if k < len(m.have) {
			old = m.have[k]
		}
		if k < len(have) {
			cur = have[k]
		}
		if old == cur {
			continue
		}
		for diff := old ^ cur; diff != 0; diff &= diff - 1 {
			b := bits.LeadingZeros8(diff & -diff)
			i := k*8 + b
			if cur&(0x80>>b) != 0 {
				s.held[i]++
				gained = true
			} else {
				s.held[i]--
			}
		}
	}
	if string(have) == string(m.have) && (have == nil) == (m.have == nil) {
		return false
	}
	// A new slice, never an update in place: answers already built share
	// the old one.
	m.have = nil
	if have != nil {
		m.have = append([]byte(nil), have...)
	}
	wasComplete := s.n > 0 && m.count == s.n
	m.count = 0
	for _, x := range m.have {
		m.count += bits.OnesCount8(x)
	}
	if isComplete := s.n > 0 && m.count == s.n; isComplete != wasComplete {
		d := 1
		if wasComplete {
			d = -1
		}
		s.complete += d
		st.complete.Add(int64(d))
	}
	switch {
	case m.count > 0 && m.hpos < 0:
		m.hpos = len(s.holders)
		s.holders = append(s.holders, m)
	case m.count == 0 && m.hpos >= 0:
		last := s.holders[len(s.holders)-1]
		s.holders[m.hpos], last.hpos = last, m.hpos
		s.holders = s.holders[:len(s.holders)-1]
		m.hpos = -1
	}
	return gained
}

func has(b []byte, i int) bool { return i/8 < len(b) && b[i/8]&(0x80>>(i%8)) != 0 }

// failed takes in one failure report from m: the accused no longer counts
// as holding the piece (a claim it could not serve is stale or a lie), and
// a corrupt one leaves the swarm. It reports whether the claim was dropped.
func (st *State) failed(s *swarm, m *member, f swarmproto.Failure, now time.Time) bool {
	bad := s.byStr[f.Peer]
	if bad == nil || bad == m || f.Piece >= s.n {
		return false
	}
	if f.Corrupt {
		st.remove(s, bad)
		s.bump(st, now)
		return true
	}
	if !has(bad.have, f.Piece) {
		return true // already dropped by another report
	}
	have := append([]byte(nil), bad.have...)
	have[f.Piece/8] &^= 0x80 >> (f.Piece % 8)
	st.setBits(s, bad, have)
	s.bump(st, now)
	return true
}

// interval is how long the asker should wait before its next request:
// requests per blob and overall stay near BlobRate and TotalRate whatever
// the swarm's size. An asker with seed pieces on offer comes back soon
// (there are few: each piece is on offer to about one asker).
func (st *State) interval(s *swarm, m *member) time.Duration {
	// A tracker short of CPU answers late and requests pile up in its
	// handlers: stretch every interval by how far past freePressure they
	// are, so a starved supernode sheds load instead of timing out.
	stretch := max(1, float64(st.pressure.Load())/freePressure)
	if m != nil && len(m.offers) > 0 {
		return min(time.Duration(stretch*float64(st.cfg.MinInterval)), st.cfg.MaxInterval)
	}
	// Members holding the whole blob send no more requests for it: only
	// the others share the rates, so the last downloads of a storm hear
	// of new holders sooner.
	asking := len(s.members) - s.complete
	d := time.Duration(float64(asking) / st.cfg.BlobRate * float64(time.Second))
	d = max(d, time.Duration(float64(st.members.Load()-st.complete.Load())/st.cfg.TotalRate*float64(time.Second)))
	d = min(time.Duration(stretch*float64(max(d, st.cfg.MinInterval))), st.cfg.MaxInterval)
	// +-10% jitter so a storm's agents do not come back in lockstep.
	return d + time.Duration((s.rng.Float64()-0.5)*0.2*float64(d))
}

// freePressure is how many requests may be answered at once before the
// tracker stretches the intervals it hands out.
const freePressure = 8

// SetPressure tells the state how many requests the driver is answering
// right now (a simulator leaves it at 0).
func (st *State) SetPressure(n int) { st.pressure.Store(int64(n)) }

// sample appends up to MaxPeers-len(out) members that hold a piece the
// asker lacks, found by a bounded number of random probes among holders.
func (st *State) sample(s *swarm, m *member, from Asker, out []swarmproto.PeerInfo) []swarmproto.PeerInfo {
	want := st.cfg.MaxPeers - len(out)
	if want <= 0 || len(s.holders) == 0 {
		return out
	}
	loopbackOK := !from.IP.IsValid() || from.IP.IsLoopback()
	picked := make([]*member, 0, want)
	tries := 4 * want
	if len(s.holders) <= tries {
		// Small swarm: look at each holder once, in random order.
		tries = len(s.holders)
	}
	start := s.rng.IntN(len(s.holders))
	small := tries == len(s.holders)
	for t := 0; t < tries && len(picked) < want; t++ {
		var p *member
		if small {
			p = s.holders[(start+t)%len(s.holders)]
		} else {
			p = s.holders[s.rng.IntN(len(s.holders))]
		}
		if p == m || len(p.addrs) == 0 || (p.loopback && !loopbackOK) || !hasMissing(p.have, m.have) || contains(picked, p) {
			continue
		}
		picked = append(picked, p)
	}
	for _, p := range picked {
		out = append(out, swarmproto.PeerInfo{ID: p.idStr, Addrs: p.addrs, Have: p.have})
	}
	return out
}

func contains(ms []*member, m *member) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

func without(ms []*member, m *member) []*member {
	for k, x := range ms {
		if x == m {
			ms[k] = ms[len(ms)-1]
			return ms[:len(ms)-1]
		}
	}
	return ms
}

// hasMissing reports whether have holds a piece that mine lacks.
func hasMissing(have, mine []byte) bool {
	for i, x := range have {
		var b byte
		if i < len(mine) {
			b = mine[i]
		}
		if x&^b != 0 {
			return true
		}
	}
	return false
}

// offerStale is how long an asker may go silent before the seed pieces on
// offer to it are offered to others.
func (st *State) offerStale() time.Duration { return 5*time.Second + 3*st.cfg.MinInterval }

// liveOffers prunes offers of piece i to members gone silent and returns
// how many remain.
func (st *State) liveOffers(s *swarm, i int, now time.Time) int {
	for k := 0; k < len(s.offered[i]); {
		o := s.offered[i][k]
		if o.gone || now.Sub(o.seen) > st.offerStale() {
			o.offers = withoutInt(o.offers, i)
			s.offered[i] = append(s.offered[i][:k], s.offered[i][k+1:]...)
			continue
		}
		k++
	}
	return len(s.offered[i])
}

func withoutInt(xs []int, x int) []int {
	for k, y := range xs {
		if y == x {
			return append(xs[:k], xs[k+1:]...)
		}
	}
	return xs
}

// seedOffer is the part of the seed's pieces shown to member m. As in
// BitTorrent's super-seeding, an asker is offered only pieces no other
// member holds or is being offered, a few at a time: each piece then
// leaves the seed's scarce upload about once and agents spread it. Offers
// stick to an asker until it or another member has the piece, or it goes
// silent. First come pieces whose every claimed holder failed the asker,
// then the piece its reader waits on and the few after it, then random
// ones. A starved asker may also get a piece already on offer to one other
// member, never the whole seed. Cost: O(pieces).
func (st *State) seedOffer(s *swarm, m *member, req *swarmproto.TrackerRequest, reported []int, now time.Time) []byte {
	if s.seedCount == 0 || m.count == s.n {
		return nil
	}
	for k := 0; k < len(m.offers); {
		i := m.offers[k]
		if has(m.have, i) || s.held[i] > 0 {
			s.offered[i] = without(s.offered[i], m)
			m.offers = append(m.offers[:k], m.offers[k+1:]...)
			continue
		}
		k++
	}
	limit := 1
	if req.Starved {
		limit = 2
	}
	try := func(i int) {
		if i < 0 || i >= s.n || !has(s.seedHave, i) || has(m.have, i) || s.held[i] > 0 || containsInt(m.offers, i) {
			return
		}
		if st.liveOffers(s, i, now) >= limit {
			return
		}
		m.offers = append(m.offers, i)
		s.offered[i] = append(s.offered[i], m)
	}
	for _, i := range reported {
		try(i)
	}
	if req.Want >= 0 {
		for i := req.Want; i < min(s.n, req.Want+max(1, st.cfg.SeedOffer/2)); i++ {
			try(i)
		}
	}
	if len(m.offers) < st.cfg.SeedOffer {
		start := s.rng.IntN(s.n)
		for k := 0; k < s.n && len(m.offers) < st.cfg.SeedOffer; k++ {
			try((start + k) % s.n)
		}
	}
	if len(m.offers) == 0 {
		return nil
	}
	offer := make([]byte, (s.n+7)/8)
	for _, i := range m.offers {
		offer[i/8] |= 0x80 >> (i % 8)
	}
	return offer
}

func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// permit grants m a back-to-source lease if fewer than Permits are out.
func (st *State) permit(s *swarm, m *member, now time.Time) *swarmproto.TrackerResponse {
	resp := &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize, Interval: st.interval(s, m).Milliseconds()}
	live := s.permits[:0]
	for _, l := range s.permits {
		if now.Before(l.until) && !l.m.gone {
			live = append(live, l)
		}
	}
	s.permits = live
	for k := range s.permits {
		if s.permits[k].m == m {
			s.permits[k].until = now.Add(st.cfg.PermitLease)
			resp.Permit, resp.PermitTTL = true, st.cfg.PermitLease.Milliseconds()
			return resp
		}
	}
	// A swarm that gained a piece lately is slow, not dead: its pieces will
	// reach the asker. Only a quiet swarm (or an asker refused for
	// PermitWait) sends anyone to the registry, and at most Permits at once.
	quiet := now.Sub(s.progress) >= st.cfg.PermitQuiet
	waited := !m.refused.IsZero() && now.Sub(m.refused) >= st.cfg.PermitWait
	if len(s.permits) < st.cfg.Permits && (quiet || waited) {
		s.permits = append(s.permits, lease{m: m, until: now.Add(st.cfg.PermitLease)})
		resp.Permit, resp.PermitTTL = true, st.cfg.PermitLease.Milliseconds()
		m.refused = time.Time{}
		return resp
	}
	s.denied++
	if m.refused.IsZero() {
		m.refused = now
	}
	return resp
}

func (st *State) release(s *swarm, m *member) {
	for k, l := range s.permits {
		if l.m == m {
			s.permits = append(s.permits[:k], s.permits[k+1:]...)
			return
		}
	}
}

// SetSize records the blob's size once the seed knows it.
func (st *State) SetSize(now time.Time, digest string, size, pieceSize int64) {
	_ = st.locked(digest, false, now, func(s *swarm) error {
		if s != nil && (s.size != size || s.pieceSize != pieceSize) {
			st.setGeometry(s, size, pieceSize)
			s.seedErr, s.seedCode = "", 0
			s.bump(st, now)
		}
		return nil
	})
}

// setGeometry resets s for a blob of size bytes in pieces of pieceSize:
// members' bitmaps and offers of another geometry are dropped.
func (st *State) setGeometry(s *swarm, size, pieceSize int64) {
	for _, m := range s.members {
		m.have, m.count, m.offers, m.hpos = nil, 0, nil, -1
	}
	st.complete.Add(-int64(s.complete))
	s.complete = 0
	s.holders, s.permits = nil, nil
	s.size, s.pieceSize, s.pieces, s.seedHave, s.seedCount = size, pieceSize, nil, nil, 0
	s.n = 0
	if size >= 0 {
		s.n = piece.Count(size, pieceSize)
	}
	s.held = make([]int32, s.n)
	s.offered = make([][]*member, s.n)
}

// AddPiece publishes the CID of piece i; pieces arrive in order.
func (st *State) AddPiece(now time.Time, digest string, i int, c cid.Cid) {
	_ = st.locked(digest, false, now, func(s *swarm) error {
		if s != nil && i == len(s.pieces) && i < s.n {
			s.pieces = append(s.pieces, c.String())
			s.bump(st, now)
		}
		return nil
	})
}

// SetMetainfo publishes a complete piece table (a blob the seed has whole).
func (st *State) SetMetainfo(now time.Time, m *piece.Metainfo, seedHave []byte) {
	_ = st.locked(m.Digest, false, now, func(s *swarm) error {
		if s == nil {
			return nil
		}
		if s.size != m.Size || s.pieceSize != m.PieceSize {
			st.setGeometry(s, m.Size, m.PieceSize)
		}
		s.pieces = s.pieces[:0]
		for _, c := range m.Pieces {
			s.pieces = append(s.pieces, c.String())
		}
		if st.setSeedHave(s, seedHave) {
			s.progress = now
		}
		s.seedErr, s.seedCode, s.seeding = "", 0, false
		s.bump(st, now)
		return nil
	})
}

func (st *State) setSeedHave(s *swarm, have []byte) bool {
	if len(have) != (s.n+7)/8 || string(have) == string(s.seedHave) {
		return false
	}
	s.seedHave = append(s.seedHave[:0], have...)
	s.seedCount = 0
	for _, x := range have {
		s.seedCount += bits.OnesCount8(x)
	}
	return true
}

// SetSeedHave publishes the seed's own durable pieces; only a real change
// counts as news.
func (st *State) SetSeedHave(now time.Time, digest string, have []byte) {
	_ = st.locked(digest, false, now, func(s *swarm) error {
		if s != nil && st.setSeedHave(s, have) {
			s.bump(st, now)
			s.progress = now
		}
		return nil
	})
}

// SeedGone records that the supernode's store no longer holds the blob
// (evicted, or quarantined after failing a check): the seed stops offering
// it, and the next poll starts the seed again.
func (st *State) SeedGone(now time.Time, digest string) {
	_ = st.locked(digest, false, now, func(s *swarm) error {
		if s == nil || s.seeding {
			return nil
		}
		for _, m := range s.members {
			for _, i := range m.offers {
				s.offered[i] = without(s.offered[i], m)
			}
			m.offers = nil
		}
		s.seedHave, s.seedCount = nil, 0
		s.bump(st, now)
		return nil
	})
}

// Fail records that the seed could not fetch the blob; the next poll hears
// of it (so its agent falls back to upstream) and a later one retries.
func (st *State) Fail(now time.Time, digest string, err error, status int) {
	_ = st.locked(digest, false, now, func(s *swarm) error {
		if s == nil {
			return nil
		}
		st.setGeometry(s, -1, 0)
		s.seedErr, s.seedCode, s.seeding = err.Error(), status, false
		s.bump(st, now)
		return nil
	})
}

// BlobStatus is the tracker's view of one blob, for the status API.
type BlobStatus struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	Pieces int    `json:"pieces_known"`
	Peers  int    `json:"peers"`
	// Permits are the back-to-source leases granted and not yet handed
	// back or expired; PermitsDenied counts refusals.
	Permits       int `json:"permits"`
	PermitsDenied int `json:"permits_denied"`
}

// Status lists every blob the tracker knows.
func (st *State) Status() []BlobStatus {
	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]BlobStatus, 0, len(st.blobs))
	for d, s := range st.blobs {
		s.mu.Lock()
		out = append(out, BlobStatus{Digest: d, Size: s.size, Pieces: len(s.pieces), Peers: len(s.members),
			Permits: len(s.permits), PermitsDenied: s.denied})
		s.mu.Unlock()
	}
	return out
}
