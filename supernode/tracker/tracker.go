// Package tracker is the supernode's view of every blob's swarm: the piece
// table the seed publishes as it hashes, and which peers hold which pieces,
// including peers still downloading. It answers agents over
// /starling/tracker/1.
package tracker

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// Seeder starts the upstream fetch of a blob the tracker has no piece
// table for. It reports back through the Tracker's Set* methods.
type Seeder interface {
	Ensure(req swarmproto.TrackerRequest)
}

// Config tunes a Tracker.
type Config struct {
	// PeerTTL drops peers not heard from for this long.
	PeerTTL time.Duration
	// MaxPeers bounds the peers handed to one asker.
	MaxPeers int
	// PollWait is how long a poll waits for news before answering.
	PollWait time.Duration
	// SeedOffer is how many of the seed's pieces one asker is shown at a
	// time (super-seeding); 0 means 8.
	SeedOffer int
	Now       func() time.Time
}

// Tracker holds swarm state for every blob.
type Tracker struct {
	cfg    Config
	host   host.Host
	seeder Seeder
	log    *zap.Logger

	mu      sync.Mutex
	blobs   map[string]*swarm
	version uint64    // one counter for all blobs, so a dropped and recreated swarm never goes back
	pruned  time.Time // last sweep of idle swarms
}

type swarm struct {
	version   uint64
	changed   chan struct{}
	size      int64
	pieceSize int64
	pieces    []cid.Cid
	seedHave  []byte
	seedErr   string
	seedCode  int
	peers     map[peer.ID]*peerEntry
	touched   time.Time // last change, for pruning idle swarms
}

type peerEntry struct {
	addrs   []string
	have    []byte
	seen    time.Time
	offered map[int]bool // seed pieces shown to this peer and not yet spread
}

// New builds a Tracker for host h; SetSeeder must be called before Register.
func New(cfg Config, h host.Host, log *zap.Logger) *Tracker {
	if cfg.PeerTTL <= 0 {
		cfg.PeerTTL = 10 * time.Minute
	}
	if cfg.MaxPeers <= 0 || cfg.MaxPeers > swarmproto.MaxPeers {
		cfg.MaxPeers = 16
	}
	if cfg.PollWait <= 0 {
		cfg.PollWait = time.Second
	}
	if cfg.SeedOffer <= 0 {
		cfg.SeedOffer = 8
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Tracker{cfg: cfg, host: h, log: log, blobs: map[string]*swarm{}}
}

// SetSeeder wires the seed (which itself needs the tracker).
func (t *Tracker) SetSeeder(s Seeder) { t.seeder = s }

// Register installs the protocol handler.
func (t *Tracker) Register() { t.host.SetStreamHandler(swarmproto.TrackerProtocol, t.handle) }

func (t *Tracker) get(digest string) *swarm {
	s, ok := t.blobs[digest]
	if !ok {
		s = &swarm{changed: make(chan struct{}), size: -1, peers: map[peer.ID]*peerEntry{}, touched: t.cfg.Now()}
		t.blobs[digest] = s
	}
	return s
}

// bump publishes a change; callers hold t.mu.
func (s *swarm) bump(t *Tracker) {
	t.version++
	s.version = t.version
	s.touched = t.cfg.Now()
	close(s.changed)
	s.changed = make(chan struct{})
}

// SetSize records the blob's size once the seed knows it.
func (t *Tracker) SetSize(digest string, size, pieceSize int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.get(digest)
	if s.size != size || s.pieceSize != pieceSize {
		s.size, s.pieceSize, s.pieces = size, pieceSize, nil
		s.seedErr, s.seedCode = "", 0
		s.bump(t)
	}
}

// AddPiece publishes the CID of piece i; pieces arrive in order.
func (t *Tracker) AddPiece(digest string, i int, c cid.Cid) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.get(digest)
	if i == len(s.pieces) {
		s.pieces = append(s.pieces, c)
		s.bump(t)
	}
}

// SetMetainfo publishes a complete piece table (a blob the seed already had).
func (t *Tracker) SetMetainfo(m *piece.Metainfo, seedHave []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.get(m.Digest)
	s.size, s.pieceSize, s.pieces, s.seedHave = m.Size, m.PieceSize, append([]cid.Cid(nil), m.Pieces...), seedHave
	s.seedErr, s.seedCode = "", 0
	s.bump(t)
}

// SetSeedHave publishes the seed's own durable pieces.
func (t *Tracker) SetSeedHave(digest string, have []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.get(digest)
	s.seedHave = have
	s.bump(t)
}

// Fail records that the seed could not fetch the blob; the next poll hears
// of it (so its agent falls back to upstream) and a later one retries.
func (t *Tracker) Fail(digest string, err error, status int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.get(digest)
	s.seedErr, s.seedCode = err.Error(), status
	s.size, s.pieces, s.seedHave = -1, nil, nil
	s.bump(t)
}

// BlobStatus is the tracker's view of one blob, for the status API.
type BlobStatus struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	Pieces int    `json:"pieces_known"`
	Peers  int    `json:"peers"`
}

// Status lists every blob the tracker knows.
func (t *Tracker) Status() []BlobStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]BlobStatus, 0, len(t.blobs))
	for d, s := range t.blobs {
		out = append(out, BlobStatus{Digest: d, Size: s.size, Pieces: len(s.pieces), Peers: len(s.peers)})
	}
	return out
}

// Metainfo returns what is known of a blob (for status and tests).
func (t *Tracker) Metainfo(digest string) (size int64, pieces int, peers int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.blobs[digest]
	if !ok {
		return -1, 0, 0
	}
	return s.size, len(s.pieces), len(s.peers)
}

func (t *Tracker) handle(st network.Stream) {
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(t.cfg.PollWait + 30*time.Second))
	var req swarmproto.TrackerRequest
	if err := wire.ReadMsg(st, &req, swarmproto.MaxRequestBytes); err != nil {
		st.Reset()
		return
	}
	from := st.Conn().RemotePeer()
	resp := t.Serve(context.Background(), from, &req)
	if err := wire.WriteMsg(st, resp); err != nil {
		t.log.Debug("write tracker response", zap.String("peer", from.String()), zap.Error(err))
		st.Reset()
	}
}

// Serve answers one request from peer from.
func (t *Tracker) Serve(ctx context.Context, from peer.ID, req *swarmproto.TrackerRequest) *swarmproto.TrackerResponse {
	if err := req.Validate(); err != nil {
		return &swarmproto.TrackerResponse{Error: "bad request: " + err.Error()}
	}
	t.mu.Lock()
	t.prune()
	s := t.get(req.Digest)
	t.updatePeer(s, from, req)
	needSeed := req.Op == swarmproto.OpPoll && s.size < 0 && s.seedErr == ""
	t.mu.Unlock()
	if needSeed && t.seeder != nil {
		t.seeder.Ensure(*req)
	}
	if req.Op == swarmproto.OpHave {
		t.mu.Lock()
		defer t.mu.Unlock()
		return &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize}
	}

	timer := time.NewTimer(t.cfg.PollWait)
	defer timer.Stop()
	for {
		t.mu.Lock()
		if s.version > req.Since || s.seedErr != "" || req.Starved || t.wantsUnoffered(s, from, req) {
			resp := t.response(s, from, req)
			if s.seedErr != "" {
				// Reported once; the next poll starts a new attempt.
				s.seedErr, s.seedCode = "", 0
			}
			t.mu.Unlock()
			return resp
		}
		ch := s.changed
		t.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			t.mu.Lock()
			resp := t.response(s, from, req)
			t.mu.Unlock()
			return resp
		case <-ctx.Done():
			return &swarmproto.TrackerResponse{Error: ctx.Err().Error()}
		}
	}
}

// prune drops, at most once a minute, swarms nobody has been heard from
// for PeerTTL, so a long-lived supernode does not keep every blob it ever
// saw. A dropped swarm is rebuilt from the store on the next poll. Callers
// hold t.mu.
func (t *Tracker) prune() {
	now := t.cfg.Now()
	if now.Sub(t.pruned) < time.Minute {
		return
	}
	t.pruned = now
	for digest, s := range t.blobs {
		for id, p := range s.peers {
			if now.Sub(p.seen) > t.cfg.PeerTTL {
				delete(s.peers, id)
			}
		}
		if len(s.peers) == 0 && now.Sub(s.touched) > t.cfg.PeerTTL {
			delete(t.blobs, digest)
		}
	}
}

// updatePeer records what the asker told us; callers hold t.mu.
func (t *Tracker) updatePeer(s *swarm, from peer.ID, req *swarmproto.TrackerRequest) {
	now := t.cfg.Now()
	for id, p := range s.peers {
		if now.Sub(p.seen) > t.cfg.PeerTTL {
			delete(s.peers, id)
		}
	}
	p, ok := s.peers[from]
	if !ok {
		p = &peerEntry{}
		s.peers[from] = p
	}
	p.seen = now
	if len(req.Addrs) > 0 {
		p.addrs = req.Addrs
	}
	if req.Have != nil && string(req.Have) != string(p.have) {
		p.have = append([]byte(nil), req.Have...)
		s.bump(t)
	}
}

// response builds an answer; callers hold t.mu.
func (t *Tracker) response(s *swarm, from peer.ID, req *swarmproto.TrackerRequest) *swarmproto.TrackerResponse {
	if s.seedErr != "" {
		return &swarmproto.TrackerResponse{Error: s.seedErr, Status: s.seedCode, Version: s.version, Size: -1}
	}
	resp := &swarmproto.TrackerResponse{Version: s.version, Size: s.size, PieceSize: s.pieceSize}
	if req.Known < len(s.pieces) {
		for _, c := range s.pieces[req.Known:] {
			resp.Pieces = append(resp.Pieces, c.String())
		}
	}
	if s.size < 0 {
		return resp
	}
	if offer := t.seedOffer(s, from, req); offer != nil {
		resp.Peers = append(resp.Peers, swarmproto.PeerInfo{
			ID: t.host.ID().String(), Addrs: p2p.AnnounceAddrs(t.host), Have: offer, Seed: true,
		})
	}
	// A bounded random subset of peers that have something the asker lacks.
	var useful []swarmproto.PeerInfo
	for id, p := range s.peers {
		if id == from || len(p.addrs) == 0 || !hasMissing(p.have, req.Have) {
			continue
		}
		useful = append(useful, swarmproto.PeerInfo{ID: id.String(), Addrs: p.addrs, Have: p.have})
	}
	rand.Shuffle(len(useful), func(i, j int) { useful[i], useful[j] = useful[j], useful[i] })
	if room := t.cfg.MaxPeers - len(resp.Peers); len(useful) > room {
		useful = useful[:room]
	}
	resp.Peers = append(resp.Peers, useful...)
	return resp
}

// wantsUnoffered reports whether the asker's reader waits on a piece the
// seed has but has not offered it yet: such a poll is answered at once.
// Callers hold t.mu.
func (t *Tracker) wantsUnoffered(s *swarm, from peer.ID, req *swarmproto.TrackerRequest) bool {
	if req.Want < 0 || s.size < 0 {
		return false
	}
	n := piece.Count(s.size, s.pieceSize)
	seed, err := piece.BitmapFromBytes(n, s.seedHave)
	if err != nil || !seed.Has(req.Want) {
		return false
	}
	for id, p := range s.peers {
		if p.offered[req.Want] {
			return false // on its way to someone (maybe the asker)
		}
		if have, err := piece.BitmapFromBytes(n, p.have); id != from && err == nil && have.Has(req.Want) {
			return false
		}
	}
	return true
}

// seedOffer is the part of the seed's pieces shown to one asker. As in
// BitTorrent's super-seeding, an asker is offered only pieces no other peer
// holds or is being offered, a few at a time: each piece then
// leaves the seed's scarce upload about once and agents spread it. Offers
// stick to an asker until it has the piece or another peer does. Callers
// hold t.mu.
func (t *Tracker) seedOffer(s *swarm, from peer.ID, req *swarmproto.TrackerRequest) []byte {
	n := piece.Count(s.size, s.pieceSize)
	seed, err := piece.BitmapFromBytes(n, s.seedHave)
	if err != nil || seed.Count() == 0 {
		return nil
	}
	if req.Starved {
		return s.seedHave
	}
	asker, err := piece.BitmapFromBytes(n, req.Have)
	if err != nil {
		asker = piece.NewBitmap(n)
	}
	held := make([]int, n)
	for id, p := range s.peers {
		if id == from {
			continue
		}
		if have, err := piece.BitmapFromBytes(n, p.have); err == nil {
			for i := range n {
				if have.Has(i) {
					held[i]++
				}
			}
		}
	}
	me := s.peers[from]
	if me == nil {
		return nil
	}
	if me.offered == nil {
		me.offered = map[int]bool{}
	}
	for i := range me.offered {
		if asker.Has(i) || held[i] > 0 {
			delete(me.offered, i)
		}
	}
	offers := make([]int, n) // how many askers are being offered each piece
	for _, p := range s.peers {
		for i := range p.offered {
			offers[i]++
		}
	}
	// A blocked reader's piece and the few after it come first, unless
	// another peer holds them or is already fetching them from the seed:
	// then the reader gets them from that peer, and in a pull storm, where
	// every client reads in order, the seed still sends each piece once.
	if req.Want >= 0 {
		for i := req.Want; i < min(n, req.Want+max(1, t.cfg.SeedOffer/2)); i++ {
			if seed.Has(i) && !asker.Has(i) && held[i] == 0 && offers[i] == 0 {
				me.offered[i] = true
				offers[i]++
			}
		}
	}
	if len(me.offered) < t.cfg.SeedOffer {
		// Each piece is on offer to one asker at a time: the others get it
		// from that one. An asker that dies with offers stuck to it is
		// covered by starvation (every piece for a starved asker).
		for _, i := range rand.Perm(n) {
			if len(me.offered) >= t.cfg.SeedOffer {
				break
			}
			if seed.Has(i) && !asker.Has(i) && held[i] == 0 && offers[i] == 0 {
				me.offered[i] = true
				offers[i]++
			}
		}
	}
	if len(me.offered) == 0 {
		return nil
	}
	offer := piece.NewBitmap(n)
	for i := range me.offered {
		offer.Set(i)
	}
	return offer.Bytes()
}

// hasMissing reports whether have holds a piece that mine lacks.
func hasMissing(have, mine []byte) bool {
	for i, x := range have {
		var m byte
		if i < len(mine) {
			m = mine[i]
		}
		if x&^m != 0 {
			return true
		}
	}
	return false
}
