package swarm

import (
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/store"
)

// newTestDownload builds download state for a blob of n pieces without
// any network: pick and peerFor only look at the state.
func newTestDownload(t *testing.T, n int) (*download, *store.Partial) {
	t.Helper()
	st, err := store.Open(store.Options{Dir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	const ps = 64 << 10
	p, err := st.OpenPartial("sha256:0000000000000000000000000000000000000000000000000000000000000001", int64(n)*ps, ps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Release)
	s := &Swarm{cfg: Config{MaxInflight: 4, PerPeer: 2}}
	d := &download{s: s, p: p, count: n, peers: map[peer.ID]*peerState{}, inflight: map[int][]peer.ID{}}
	for i := range n {
		d.order = append(d.order, i)
		d.cids = append(d.cids, cid.Cid{})
	}
	return d, p
}

func bitmap(n int, set ...int) piece.Bitmap {
	b := piece.NewBitmap(n)
	for _, i := range set {
		b.Set(i)
	}
	return b
}

func TestPickRarestFirst(t *testing.T) {
	d, p := newTestDownload(t, 4)
	// Piece 2 is held by one peer, the others by three.
	d.peers["a"] = &peerState{have: bitmap(4, 0, 1, 2, 3)}
	d.peers["b"] = &peerState{have: bitmap(4, 0, 1, 3)}
	d.peers["c"] = &peerState{have: bitmap(4, 0, 1, 3)}
	have := p.Have()
	i, from, ok := d.pick(&have, time.Now())
	if !ok || i != 2 || from != "a" {
		t.Fatalf("pick = %d from %s (%v), want the rarest piece 2 from a", i, from, ok)
	}
}

func TestPickPrefersAgentsOverSeedAndSkipsBanned(t *testing.T) {
	d, p := newTestDownload(t, 2)
	d.peers["seed"] = &peerState{have: bitmap(2, 0, 1), seed: true}
	d.peers["bad"] = &peerState{have: bitmap(2, 0, 1), banned: true}
	d.peers["agent"] = &peerState{have: bitmap(2, 0)}
	from, ok := d.peerFor(0, time.Now())
	if !ok || from != "agent" {
		t.Fatalf("peerFor(0) = %s, want the agent over the seed", from)
	}
	from, ok = d.peerFor(1, time.Now())
	if !ok || from != "seed" {
		t.Fatalf("peerFor(1) = %s, want the seed (the banned peer must not be used)", from)
	}
	d.peers["agent"].inflight = 2 // at its per-peer cap
	if from, _ := d.peerFor(0, time.Now()); from != "seed" {
		t.Fatalf("peerFor(0) with a saturated agent = %s, want the seed", from)
	}
	d.peers["seed"].cooldown = time.Now().Add(time.Minute)
	if _, ok := d.peerFor(0, time.Now()); ok {
		t.Fatal("a peer in cooldown or at its cap was picked")
	}
	_ = p
}

func TestPickEndgameRacesASecondPeer(t *testing.T) {
	d, p := newTestDownload(t, 2)
	d.peers["a"] = &peerState{have: bitmap(2, 0, 1), inflight: 1}
	d.peers["b"] = &peerState{have: bitmap(2, 0, 1)}
	if err := p.WritePiece(0, make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	d.inflight[1] = []peer.ID{"a"}
	have := p.Have()
	i, from, ok := d.pick(&have, time.Now())
	if !ok || i != 1 || from != "b" {
		t.Fatalf("endgame pick = %d from %s (%v), want piece 1 from b", i, from, ok)
	}
}
