package swarm

import (
	"errors"
	"math/rand/v2"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// Sched is the policy of one blob's swarm download, as pure code: it takes
// tracker answers, piece outcomes, the time and a seeded random source, and
// decides which piece to fetch from which peer, when to race a second peer
// (endgame), when the download is starved of sources, and when it has
// stalled. It does no I/O and reads no clock, so the agent's driver
// (download.go) and the simulator (e2e/simulate) run the very same code.
// Every choice is deterministic given its inputs: peers are kept in the
// order they were learned, never in map order. Not safe for concurrent use.
type Sched struct {
	cfg             SchedConfig
	self            peer.ID
	size, pieceSize int64
	count, known    int
	version         uint64

	peers    map[peer.ID]*peerState
	byStr    map[string]*peerState // by encoded ID, so known peers are not decoded again
	fresh    []*peerState          // peers never watched (a watch picks one at random)
	holders  [][]*peerState        // per piece: usable (not banned) peers holding it, in the order they got it
	inflight [][]peer.ID           // per piece: peers it is being fetched from
	running  int
	watching int   // peers watched now
	order    []int // a random permutation: ties in rarity break randomly
	rng      *rand.Rand

	progress   time.Time // last piece completed (or a wait that is not a stall)
	lastData   time.Time // last piece bytes received
	swarmMoved time.Time // last tracker news of progress anywhere in the swarm
	idle       time.Time // since when no missing piece had a known source (zero: has one)
	sourced    bool      // the last pick saw a missing piece some known peer has
	starved    bool      // no source for too long: ask the tracker for more of the seed
	failed     []Failure // claimed pieces peers did not serve, for the tracker
	denied     int       // back-to-source permits refused in a row
	retryAt    time.Time // no stall verdict before this (a permit was refused)
}

// SchedConfig tunes a Sched.
type SchedConfig struct {
	// MaxInflight bounds the download's concurrent piece fetches.
	MaxInflight int
	// PerPeer bounds concurrent fetches from one peer.
	PerPeer int
	// StallTimeout is how long a download may see no progress of any kind
	// before it is stalled.
	StallTimeout time.Duration
	// Watch is how many peers' bitmaps the download watches at once
	// (0: DefaultWatch; negative: none).
	Watch int
}

// DefaultWatch is how many peers a download watches by default: enough
// that a new piece is heard of by a few dozen peers the moment it lands
// (each peer accepts pieceserver.MaxWatchers watchers per blob), few
// enough that the news costs each peer a few messages per piece.
const DefaultWatch = 16

type peerState struct {
	id       peer.ID
	have     piece.Bitmap
	seed     bool
	inflight int
	failures int
	banned   bool
	cooldown time.Time
	watched  bool
}

// Fetch is one decision: fetch piece Piece from peer From.
type Fetch struct {
	Piece int
	From  peer.ID
}

// Outcome is how one piece fetch ended.
type Outcome int

// Piece fetch outcomes.
const (
	Got         Outcome = iota // verified and stored
	Dup                        // verified, but an endgame twin stored it first
	Corrupt                    // the bytes did not match the piece's CID
	Busy                       // the peer had no upload slot
	Unavailable                // the peer does not have the piece it claimed
	Failed                     // dial, stream or timeout failure
)

// Failure is a claimed piece a peer did not serve, reported to the
// tracker so that a stale or lying announcer cannot stall everyone.
type Failure struct {
	Peer    peer.ID
	Piece   int
	Corrupt bool
}

// maxFailureReports bounds the failures one tracker request carries.
const maxFailureReports = 32

// Peer is a peer learned from a tracker answer, with its addresses, for the
// driver to dial.
type Peer struct {
	ID    peer.ID
	Addrs []string
}

// errGeometry is returned when the seed restarted the blob with another
// size or piece size.
var errGeometry = errors.New("seed restarted the blob with another geometry")

// NewSched starts the policy of a download of a blob of size bytes, cut in
// pieces of pieceSize, by peer self, at time now.
func NewSched(cfg SchedConfig, self peer.ID, size, pieceSize int64, rng *rand.Rand, now time.Time) *Sched {
	n := piece.Count(size, pieceSize)
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 8
	}
	if cfg.PerPeer <= 0 {
		cfg.PerPeer = 2
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 15 * time.Second
	}
	if cfg.Watch == 0 {
		cfg.Watch = DefaultWatch
	}
	return &Sched{
		cfg: cfg, self: self, size: size, pieceSize: pieceSize, count: n,
		peers: map[peer.ID]*peerState{}, byStr: map[string]*peerState{}, holders: make([][]*peerState, n), inflight: make([][]peer.ID, n),
		order: rng.Perm(n), rng: rng, progress: now,
	}
}

// Count is the blob's number of pieces.
func (s *Sched) Count() int { return s.count }

// Known is how many piece CIDs the tracker has told us.
func (s *Sched) Known() int { return s.known }

// Running is how many fetches are in flight.
func (s *Sched) Running() int { return s.running }

// Tracker takes in a tracker answer: new piece CIDs (counted; the driver
// keeps the CIDs) and peers with their bitmaps. It returns the peers heard
// of for the first time. News that the swarm moved on counts as progress:
// waiting our turn behind a slow seed is not a stall.
func (s *Sched) Tracker(now time.Time, resp *swarmproto.TrackerResponse) ([]Peer, error) {
	if resp.Size != s.size || resp.PieceSize != s.pieceSize {
		return nil, errGeometry
	}
	s.known = min(s.count, s.known+len(resp.Pieces))
	if resp.Version > s.version {
		if s.version > 0 {
			s.swarmMoved = now
		}
		s.version = resp.Version
	}
	var fresh []Peer
	for _, info := range resp.Peers {
		have, err := piece.BitmapFromBytes(s.count, info.Have)
		if err != nil {
			continue
		}
		ps, ok := s.byStr[info.ID]
		if !ok {
			id, err := peer.Decode(info.ID)
			if err != nil || id == s.self {
				continue
			}
			if ps, ok = s.peers[id]; !ok {
				ps = &peerState{id: id, have: piece.NewBitmap(s.count)}
				s.peers[id] = ps
				s.fresh = append(s.fresh, ps)
				fresh = append(fresh, Peer{ID: id, Addrs: info.Addrs})
			}
			s.byStr[info.ID] = ps
		}
		ps.seed = info.Seed
		s.setHave(ps, have)
	}
	return fresh, nil
}

// PeerHave takes in a peer's current bitmap, learned from the peer itself
// (a piece answer carries it), fresher than the tracker's.
func (s *Sched) PeerHave(id peer.ID, have []byte) {
	ps, ok := s.peers[id]
	if !ok || ps.seed {
		return // the seed's offer is the tracker's to make
	}
	b, err := piece.BitmapFromBytes(s.count, have)
	if err != nil {
		return
	}
	s.setHave(ps, b)
}

// setHave replaces a peer's bitmap, keeping the holder counts right.
func (s *Sched) setHave(ps *peerState, have piece.Bitmap) {
	if !ps.banned {
		for i := range s.count {
			if a, b := ps.have.Has(i), have.Has(i); a != b {
				if b {
					s.holders[i] = append(s.holders[i], ps)
				} else {
					s.holders[i] = dropPeer(s.holders[i], ps)
				}
			}
		}
	}
	ps.have = have
}

// ban stops using a peer for this blob.
func (s *Sched) ban(ps *peerState) {
	if ps.banned {
		return
	}
	for i := range s.count {
		if ps.have.Has(i) {
			s.holders[i] = dropPeer(s.holders[i], ps)
		}
	}
	ps.banned = true
}

// Watch picks a peer whose bitmap to watch, or false: while fewer than
// Watch are watched, an agent never watched before, at random (not the
// seed, whose pieces the tracker offers, and not a banned peer). At random,
// not in the order learned: the tracker hands the first holders to
// everyone, and each peer takes only so many watchers. The
// tracker's answers come only every interval, which grows with the swarm;
// watched peers tell of a new piece the moment it lands, so pieces spread
// peer to peer at transfer speed whatever the swarm's size.
func (s *Sched) Watch() (peer.ID, bool) {
	if s.watching >= s.cfg.Watch {
		return "", false
	}
	for len(s.fresh) > 0 {
		k := s.rng.IntN(len(s.fresh))
		ps := s.fresh[k]
		last := len(s.fresh) - 1
		s.fresh[k], s.fresh[last] = s.fresh[last], nil
		s.fresh = s.fresh[:last]
		if ps.seed || ps.banned {
			continue
		}
		ps.watched = true
		s.watching++
		return ps.id, true
	}
	return "", false
}

// Unwatched records that the watch of peer id ended (it holds the whole
// blob, refused, or went away); another peer may be watched instead.
func (s *Sched) Unwatched(id peer.ID) {
	if ps, ok := s.peers[id]; ok && ps.watched {
		ps.watched = false
		s.watching--
	}
}

// SawData records that piece bytes arrived at t.
func (s *Sched) SawData(t time.Time) {
	if t.After(s.lastData) {
		s.lastData = t
	}
}

// Waited records a wait that is not a stall (every piece buffer of the
// agent is in use by other blobs).
func (s *Sched) Waited(now time.Time) { s.progress = now }

// readerSlots is how many fetches may serve a blocked reader at once.
const readerSlots = 2

// Next picks the next fetch, or false when there is none to start now
// (no room, or no usable peer has a missing piece). have is what the store
// holds; waiting is the piece a blocked reader needs, or -1. The pieces a
// blocked reader needs come first, but only a few at a time: when every
// client reads in order (a pull storm) the rest of the slots go rarest
// first, which is what spreads pieces fastest. In the endgame a piece
// already in flight is raced from a second peer, so one slow peer cannot
// hold up the blob. Next decides only; Start commits the choice.
func (s *Sched) Next(now time.Time, have *piece.Bitmap, waiting int) (Fetch, bool) {
	if s.running >= s.cfg.MaxInflight {
		return Fetch{}, false
	}
	known := s.known
	if w := waiting; w >= 0 && w < known && s.readerSlots(w) < readerSlots {
		for i := w; i < min(known, w+readerSlots); i++ {
			if !have.Has(i) && len(s.inflight[i]) == 0 {
				if from, ok := s.peerFor(i, now, nil); ok {
					return Fetch{i, from}, true
				}
			}
		}
	}
	best, bestFrom, bestRarity := -1, peer.ID(""), 0
	missing := 0
	s.sourced = false
	for _, i := range s.order {
		if i >= known || have.Has(i) {
			continue
		}
		missing++
		if len(s.inflight[i]) > 0 {
			continue
		}
		rarity := len(s.holders[i])
		if rarity > 0 {
			s.sourced = true
		}
		if rarity == 0 || (best >= 0 && rarity >= bestRarity) {
			continue
		}
		if from, ok := s.peerFor(i, now, nil); ok {
			best, bestFrom, bestRarity = i, from, rarity
		}
	}
	if best >= 0 {
		return Fetch{best, bestFrom}, true
	}
	if missing > 0 && missing <= s.cfg.MaxInflight && known == s.count {
		for _, i := range s.order {
			if have.Has(i) || len(s.inflight[i]) != 1 {
				continue
			}
			if from, ok := s.peerFor(i, now, s.inflight[i]); ok {
				return Fetch{i, from}, true
			}
		}
	}
	return Fetch{}, false
}

// Start commits a fetch Next chose.
func (s *Sched) Start(f Fetch) {
	s.running++
	s.inflight[f.Piece] = append(s.inflight[f.Piece], f.From)
	s.peers[f.From].inflight++
}

// readerSlots counts fetches in flight at or after the reader's piece.
func (s *Sched) readerSlots(w int) int {
	n := 0
	for i := w; i < min(s.count, w+readerSlots); i++ {
		if len(s.inflight[i]) > 0 {
			n++
		}
	}
	return n
}

// peerFor picks the least loaded usable peer that has piece i, the
// earliest holder among equals. Agents are preferred over the seed: its
// upload is the swarm's scarcest resource, used only when no agent can
// serve the piece right now.
func (s *Sched) peerFor(i int, now time.Time, exclude []peer.ID) (peer.ID, bool) {
	var best peer.ID
	bestLoad, ties := 1<<30, 0
outer:
	for _, ps := range s.holders[i] {
		if ps.inflight >= s.cfg.PerPeer || now.Before(ps.cooldown) {
			continue
		}
		for _, x := range exclude {
			if x == ps.id {
				continue outer
			}
		}
		load := ps.inflight
		if ps.seed {
			load += 1 << 20
		}
		switch {
		case load < bestLoad:
			best, bestLoad, ties = ps.id, load, 1
		case load == bestLoad:
			// Equals are chosen uniformly (reservoir sampling): agents
			// that all see the same holders do not all pick the same one.
			ties++
			if s.rng.IntN(ties) == 0 {
				best = ps.id
			}
		}
	}
	return best, best != ""
}

func dropPeer(list []*peerState, ps *peerState) []*peerState {
	for k, x := range list {
		if x == ps {
			return append(list[:k], list[k+1:]...)
		}
	}
	return list
}

// Done takes in how fetch f ended at now.
func (s *Sched) Done(now time.Time, f Fetch, out Outcome) {
	s.running--
	s.inflight[f.Piece] = remove(s.inflight[f.Piece], f.From)
	ps := s.peers[f.From]
	ps.inflight--
	switch out {
	case Got:
		s.progress = now
		s.denied = 0
		ps.failures = 0
	case Dup:
	case Corrupt:
		s.ban(ps)
		s.report(ps, Failure{Peer: f.From, Piece: f.Piece, Corrupt: true})
	case Busy:
		ps.cooldown = now.Add(1000 * time.Millisecond)
	case Unavailable:
		// A claimed piece that is not there is a stale announcement (or a
		// lie): forget the claim, tell the tracker, and count it against
		// the peer, so a peer that evicted the blob cannot stall everyone.
		if ps.have.Has(f.Piece) {
			have := ps.have.Clone()
			have.Clear(f.Piece)
			s.setHave(ps, have)
		}
		s.report(ps, Failure{Peer: f.From, Piece: f.Piece})
		ps.cooldown = now.Add(50 * time.Millisecond)
		if ps.failures++; ps.failures >= 3 {
			s.ban(ps)
		}
	default:
		s.report(ps, Failure{Peer: f.From, Piece: f.Piece})
		ps.cooldown = now.Add(time.Second)
		if ps.failures++; ps.failures >= 3 {
			s.ban(ps)
		}
	}
}

// Banned reports whether peer id has been dropped for this blob.
func (s *Sched) Banned(id peer.ID) bool {
	ps, ok := s.peers[id]
	return ok && ps.banned
}

// report queues a failure for the tracker; the seed's own failures are
// not claims to correct.
func (s *Sched) report(ps *peerState, f Failure) {
	if !ps.seed && len(s.failed) < maxFailureReports {
		s.failed = append(s.failed, f)
	}
}

// Failures hands over (and forgets) the failures not yet reported.
func (s *Sched) Failures() []Failure {
	out := s.failed
	s.failed = nil
	return out
}

// starveAfter is how long a download may go with nothing in flight and no
// known peer holding any piece it lacks (its sources are gone or banned)
// before it asks for more of the seed. Busy peers are not starvation.
const starveAfter = time.Second

// Starved reports, as of now, a download with no source: nothing in flight,
// no known peer holding a missing piece, and no news from the swarm, for
// starveAfter. (With news, pieces are spreading and one will reach us.)
func (s *Sched) Starved(now time.Time) bool {
	switch {
	case s.running > 0 || s.sourced:
		s.idle = time.Time{}
		s.starved = false
	case s.idle.IsZero():
		s.idle = now
	case now.Sub(s.idle) > starveAfter && now.Sub(s.swarmMoved) > starveAfter:
		s.starved = true
	}
	return s.starved
}

// Stalled reports a download that for StallTimeout has completed no piece,
// received no byte, and heard of no progress anywhere in its swarm, while
// it had no source to wait on. A slow swarm (low bandwidth, busy peers, a
// seed still handing out the first pieces) is not stalled: going back to
// source then would multiply the registry's load, the very thing Starling
// avoids.
//
// A stalled download asks the blob's supernode for a back-to-source
// permit; when it is refused (Denied) the download stays with the swarm
// and is not stalled again before a backoff.
func (s *Sched) Stalled(now time.Time) bool {
	if now.Before(s.retryAt) {
		return false
	}
	last := s.progress
	if s.lastData.After(last) {
		last = s.lastData
	}
	if s.swarmMoved.After(last) {
		last = s.swarmMoved
	}
	if s.sourced && s.running == 0 {
		// Sources exist but are all busy or cooling down: that is contention.
		return false
	}
	return now.Sub(last) > s.cfg.StallTimeout
}

// maxPermitBackoff bounds the wait between two permit requests.
const maxPermitBackoff = 16 * time.Second

// Denied records that the owning supernode refused a back-to-source permit
// at now (others hold the few it grants): keep using the swarm, and ask
// again after 1 s, 2 s, 4 s... up to maxPermitBackoff.
func (s *Sched) Denied(now time.Time) {
	s.retryAt = now.Add(min(time.Second<<min(s.denied, 5), maxPermitBackoff))
	s.denied++
}

func remove(ids []peer.ID, id peer.ID) []peer.ID {
	for k, x := range ids {
		if x == id {
			return append(ids[:k], ids[k+1:]...)
		}
	}
	return ids
}
