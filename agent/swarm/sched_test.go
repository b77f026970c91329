package swarm

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

const testPieceSize = 64 << 10

// testPeer returns the k-th of a fixed set of valid peer IDs.
func testPeer(t testing.TB, k int) peer.ID {
	t.Helper()
	var seed [32]byte
	seed[0], seed[1] = byte(k), byte(k>>8)
	_, pub, err := crypto.GenerateEd25519Key(rand.NewChaCha8(seed))
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func bitmap(n int, set ...int) piece.Bitmap {
	b := piece.NewBitmap(n)
	for _, i := range set {
		b.Set(i)
	}
	return b
}

// newTestSched is a Sched for a blob of n pieces whose CIDs are all known,
// with the random order replaced by the identity so that ties are plain.
func newTestSched(t *testing.T, n int, now time.Time) *Sched {
	t.Helper()
	s := NewSched(SchedConfig{MaxInflight: 4, PerPeer: 2}, testPeer(t, 0), int64(n)*testPieceSize, testPieceSize, rand.New(rand.NewPCG(1, 2)), now)
	for i := range s.order {
		s.order[i] = i
	}
	s.known = n
	return s
}

// announce feeds the scheduler a tracker answer with these peers.
func announce(t *testing.T, s *Sched, now time.Time, version uint64, peers map[peer.ID]piece.Bitmap, seed peer.ID) {
	t.Helper()
	resp := &swarmproto.TrackerResponse{Version: version, Size: s.size, PieceSize: s.pieceSize}
	ids := make([]peer.ID, 0, len(peers))
	for id := range peers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		resp.Peers = append(resp.Peers, swarmproto.PeerInfo{ID: id.String(), Have: peers[id].Bytes(), Seed: id == seed})
	}
	if _, err := s.Tracker(now, resp); err != nil {
		t.Fatal(err)
	}
}

func TestSchedRarestFirst(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 4, now)
	a, b, c := testPeer(t, 1), testPeer(t, 2), testPeer(t, 3)
	// Piece 2 is held by one peer, the others by three.
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{
		a: bitmap(4, 0, 1, 2, 3), b: bitmap(4, 0, 1, 3), c: bitmap(4, 0, 1, 3),
	}, "")
	have := piece.NewBitmap(4)
	f, ok := s.Next(now, &have, -1)
	if !ok || f.Piece != 2 || f.From != a {
		t.Fatalf("Next = %+v (%v), want the rarest piece 2 from a", f, ok)
	}
}

func TestSchedPrefersAgentsOverSeedAndSkipsBanned(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 2, now)
	seed, bad, agent := testPeer(t, 1), testPeer(t, 2), testPeer(t, 3)
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{seed: bitmap(2, 0, 1), bad: bitmap(2, 0, 1), agent: bitmap(2, 0)}, seed)
	// bad sends a corrupt piece and is dropped.
	s.Start(Fetch{1, bad})
	s.Done(now, Fetch{1, bad}, Corrupt)
	if from, ok := s.peerFor(0, now, nil); !ok || from != agent {
		t.Fatalf("peerFor(0) = %s, want the agent over the seed", from)
	}
	if from, ok := s.peerFor(1, now, nil); !ok || from != seed {
		t.Fatalf("peerFor(1) = %s, want the seed (the banned peer must not be used)", from)
	}
	if got := s.Failures(); len(got) != 1 || got[0].Peer != bad || !got[0].Corrupt {
		t.Fatalf("failures = %+v, want one corrupt piece from the banned peer", got)
	}
	s.Start(Fetch{0, agent})
	s.Start(Fetch{0, agent}) // at its per-peer cap
	if from, _ := s.peerFor(0, now, nil); from != seed {
		t.Fatalf("peerFor(0) with a saturated agent = %s, want the seed", from)
	}
	s.Start(Fetch{1, seed})
	s.Done(now, Fetch{1, seed}, Busy) // cools down
	if _, ok := s.peerFor(0, now, nil); ok {
		t.Fatal("a peer in cooldown or at its cap was picked")
	}
	if _, ok := s.peerFor(0, now.Add(time.Second), nil); !ok {
		t.Fatal("the seed's cooldown never ended")
	}
}

func TestSchedEndgameRacesASecondPeer(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 2, now)
	a, b := testPeer(t, 1), testPeer(t, 2)
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{a: bitmap(2, 0, 1), b: bitmap(2, 0, 1)}, "")
	s.Start(Fetch{1, a})
	have := bitmap(2, 0)
	f, ok := s.Next(now, &have, -1)
	if !ok || f.Piece != 1 || f.From != b {
		t.Fatalf("endgame Next = %+v (%v), want piece 1 from b", f, ok)
	}
}

func TestSchedReaderFirst(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 8, now)
	a := testPeer(t, 1)
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{a: bitmap(8, 0, 1, 2, 3, 4, 5, 6, 7)}, "")
	have := bitmap(8, 0)
	if f, _ := s.Next(now, &have, 5); f.Piece != 5 {
		t.Fatalf("Next with a reader blocked on piece 5 = %+v, want piece 5", f)
	}
}

// The same inputs and seed give the same decisions: nothing depends on map
// order or a global source.
func TestSchedDeterministic(t *testing.T) {
	run := func() []Fetch {
		now := time.Unix(1000, 0)
		s := NewSched(SchedConfig{MaxInflight: 64, PerPeer: 64}, testPeer(t, 0), 64*testPieceSize, testPieceSize, rand.New(rand.NewPCG(7, 7)), now)
		resp := &swarmproto.TrackerResponse{Version: 1, Size: s.size, PieceSize: s.pieceSize}
		for k := 1; k <= 10; k++ {
			b := bitmap(64, k, k+10, k+20, 40, 41, 42, 43, 44, 45, 46, 47)
			resp.Peers = append(resp.Peers, swarmproto.PeerInfo{ID: testPeer(t, k).String(), Have: b.Bytes()})
		}
		for range 64 {
			resp.Pieces = append(resp.Pieces, "x")
		}
		if _, err := s.Tracker(now, resp); err != nil {
			t.Fatal(err)
		}
		have := piece.NewBitmap(64)
		var out []Fetch
		for {
			f, ok := s.Next(now, &have, -1)
			if !ok {
				return out
			}
			s.Start(f)
			out = append(out, f)
		}
	}
	first := run()
	if len(first) == 0 {
		t.Fatal("no decisions")
	}
	for range 5 {
		if again := run(); !slices.Equal(first, again) {
			t.Fatalf("decisions differ between runs:\n%v\n%v", first, again)
		}
	}
}

func TestSchedStalledAndStarved(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newTestSched(t, 2, t0)
	s.cfg.StallTimeout = 15 * time.Second
	have := piece.NewBitmap(2)
	s.Next(t0, &have, -1) // no peers: no source
	if s.Starved(t0) || s.Starved(t0.Add(time.Second)) {
		t.Fatal("starved before starveAfter")
	}
	if !s.Starved(t0.Add(2 * time.Second)) {
		t.Fatal("not starved after 2 s with no source and no news")
	}
	if s.Stalled(t0.Add(14 * time.Second)) {
		t.Fatal("stalled before the timeout")
	}
	// News from the swarm (the tracker's version moved) is progress.
	announce(t, s, t0, 1, nil, "")
	announce(t, s, t0.Add(10*time.Second), 2, nil, "")
	if s.Stalled(t0.Add(20 * time.Second)) {
		t.Fatal("stalled although the swarm moved 10 s ago")
	}
	if !s.Stalled(t0.Add(26 * time.Second)) {
		t.Fatal("not stalled after 16 s without any progress")
	}
	// Bytes arriving are progress.
	s.SawData(t0.Add(25 * time.Second))
	if s.Stalled(t0.Add(30 * time.Second)) {
		t.Fatal("stalled although bytes arrived 5 s ago")
	}
}

// A peer that answers "piece not available" for a piece it claimed is not
// asked for it again, the claim is reported to the tracker, and after a few
// such answers the peer is dropped: a stale announcer (it evicted the
// blob) cannot stall the download (issue 7).
func TestSchedUnavailableClaimCountsAgainstThePeer(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 4, now)
	stale, seed := testPeer(t, 1), testPeer(t, 2)
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{stale: bitmap(4, 0, 1, 2, 3), seed: bitmap(4, 0, 1, 2, 3)}, seed)
	have := piece.NewBitmap(4)
	if f, ok := s.Next(now, &have, -1); !ok || f.From != stale {
		t.Fatalf("Next = %+v (%v), want a piece from the agent before the seed", f, ok)
	}
	for k := range 3 {
		f := Fetch{k, stale}
		s.Start(f)
		s.Done(now, f, Unavailable)
		if len(s.holders[f.Piece]) != 1 {
			t.Fatalf("piece %d has %d holders after the stale claim, want 1 (the seed)", f.Piece, len(s.holders[f.Piece]))
		}
		now = now.Add(time.Second) // past any cooldown
	}
	if !s.Banned(stale) {
		t.Fatal("a peer that failed three claims in a row is still used")
	}
	got := s.Failures()
	if len(got) != 3 || got[0].Peer != stale || got[0].Corrupt {
		t.Fatalf("failures for the tracker = %+v, want the three stale claims", got)
	}
	f, ok := s.Next(now, &have, -1)
	if !ok || f.From != seed {
		t.Fatalf("Next = %+v (%v), want the seed", f, ok)
	}
	// The seed's own failures are not claims to report.
	s.Start(f)
	s.Done(now, f, Failed)
	if got := s.Failures(); len(got) != 0 {
		t.Fatalf("reported the seed's failure: %+v", got)
	}
}

// A stalled download whose back-to-source permit is refused keeps using
// the swarm and is not stalled again until a growing backoff has passed.
func TestSchedPermitDeniedBacksOff(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newTestSched(t, 2, t0)
	s.cfg.StallTimeout = time.Second
	at := t0.Add(2 * time.Second)
	if !s.Stalled(at) {
		t.Fatal("not stalled after twice the timeout")
	}
	s.Denied(at)
	if s.Stalled(at.Add(500 * time.Millisecond)) {
		t.Fatal("stalled again right after a refused permit")
	}
	if !s.Stalled(at.Add(1100 * time.Millisecond)) {
		t.Fatal("not stalled after the first backoff (1 s)")
	}
	at = at.Add(1100 * time.Millisecond)
	s.Denied(at)
	if s.Stalled(at.Add(1500 * time.Millisecond)) {
		t.Fatal("the second backoff did not grow")
	}
	if !s.Stalled(at.Add(2100 * time.Millisecond)) {
		t.Fatal("not stalled after the second backoff (2 s)")
	}
}

// A peer's own bitmap (from its piece answers) replaces the tracker's
// older one, holder counts included; the seed's offers are left alone.
func TestSchedPeerHave(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestSched(t, 4, now)
	a, seed := testPeer(t, 1), testPeer(t, 2)
	announce(t, s, now, 1, map[peer.ID]piece.Bitmap{a: bitmap(4, 0), seed: bitmap(4, 1)}, seed)
	fresh := bitmap(4, 0, 2, 3)
	s.PeerHave(a, fresh.Bytes())
	if len(s.holders[2]) != 1 || len(s.holders[3]) != 1 || len(s.holders[0]) != 1 {
		t.Fatalf("holders after PeerHave: %d %d %d %d", len(s.holders[0]), len(s.holders[1]), len(s.holders[2]), len(s.holders[3]))
	}
	all := bitmap(4, 0, 1, 2, 3)
	s.PeerHave(seed, all.Bytes())
	if len(s.holders[3]) != 1 {
		t.Fatal("the seed's answer widened its offer")
	}
	s.PeerHave(a, []byte{0xff, 0xff}) // malformed: ignored
	if len(s.holders[2]) != 1 {
		t.Fatal("a malformed bitmap changed the holders")
	}
}

func TestWatchPicksEachAgentOnceWithinTheBound(t *testing.T) {
	now := time.Unix(100, 0)
	s := NewSched(SchedConfig{Watch: 2}, testPeer(t, 0), 4*testPieceSize, testPieceSize, rand.New(rand.NewPCG(1, 2)), now)
	seed, a, b, c := testPeer(t, 1), testPeer(t, 2), testPeer(t, 3), testPeer(t, 4)
	resp := &swarmproto.TrackerResponse{Version: 1, Size: s.size, PieceSize: s.pieceSize, Interval: 1000, Peers: []swarmproto.PeerInfo{
		{ID: seed.String(), Have: bitmap(4, 0).Bytes(), Seed: true},
		{ID: a.String(), Have: bitmap(4, 1).Bytes()},
		{ID: b.String(), Have: bitmap(4).Bytes()},
		{ID: c.String(), Have: bitmap(4, 2).Bytes()},
	}}
	if _, err := s.Tracker(now, resp); err != nil {
		t.Fatal(err)
	}
	var got []peer.ID
	for {
		id, ok := s.Watch()
		if !ok {
			break
		}
		got = append(got, id)
	}
	if len(got) != 2 || got[0] == got[1] || slices.Contains(got, seed) {
		t.Fatalf("watched %v, want two distinct agents (never the seed, at most Watch)", got)
	}
	left := slices.DeleteFunc([]peer.ID{a, b, c}, func(id peer.ID) bool { return slices.Contains(got, id) })[0]
	s.Unwatched(got[0])
	s.Unwatched(got[0]) // a second end of the same watch frees nothing more
	if id, ok := s.Watch(); !ok || id != left {
		t.Fatalf("after one watch ended: %v %v, want the agent never watched, %v", id, ok, left)
	}
	if id, ok := s.Watch(); ok {
		t.Fatalf("watched %v past the bound", id)
	}
	s.Unwatched(left)
	if id, ok := s.Watch(); ok {
		t.Fatalf("watched %v again: each peer is watched once", id)
	}
	// News from a watched peer is a fresh bitmap: its piece becomes a source.
	s.PeerHave(got[1], bitmap(4, 3).Bytes())
	have := bitmap(4, 0, 1, 2)
	s.known = 4
	if f, ok := s.Next(now, &have, -1); !ok || f.Piece != 3 || f.From != got[1] {
		t.Fatalf("next %+v %v, want piece 3 from the watched peer", f, ok)
	}
}
