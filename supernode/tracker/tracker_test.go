package tracker

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

var digest = "sha256:" + strings.Repeat("cd", 32)

type countingSeeder struct{ calls int }

func (c *countingSeeder) Ensure(swarmproto.TrackerRequest) { c.calls++ }

func newTracker(t *testing.T) (*Tracker, *countingSeeder) {
	t.Helper()
	h, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	tr := New(Config{MaxPeers: 5, SeedOffer: 2, PollWait: 5 * time.Second}, h, zaptest.NewLogger(t))
	s := &countingSeeder{}
	tr.SetSeeder(s)
	return tr, s
}

func bits(n int, set ...int) []byte {
	b := piece.NewBitmap(n)
	for _, i := range set {
		b.Set(i)
	}
	return b.Bytes()
}

func poll(tr *Tracker, from peer.ID, have []byte, starved bool) *swarmproto.TrackerResponse {
	return tr.Serve(context.Background(), from, &swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app",
		Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: have, Starved: starved, Want: -1,
	})
}

func TestPeersAreABoundedSubsetOfUsefulOnes(t *testing.T) {
	tr, seeder := newTracker(t)
	tr.SetSize(digest, 4<<20, 1<<20) // 4 pieces
	for i := range 12 {
		have := bits(4, 0) // knows nothing the asker lacks
		if i%2 == 0 {
			have = bits(4, 0, 1, 2, 3)
		}
		tr.Serve(context.Background(), peer.ID(fmt.Sprint("p", i)), &swarmproto.TrackerRequest{
			Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: have, Want: -1,
		})
	}
	resp := poll(tr, "asker", bits(4, 0), false)
	if resp.Error != "" {
		t.Fatal(resp.Error)
	}
	if len(resp.Peers) != 5 {
		t.Fatalf("%d peers, want the cap of 5", len(resp.Peers))
	}
	for _, p := range resp.Peers {
		if p.ID == "asker" || string(p.Have) != string(bits(4, 0, 1, 2, 3)) {
			t.Fatalf("peer %s with %x is not useful to the asker", p.ID, p.Have)
		}
	}
	if seeder.calls != 0 {
		t.Fatalf("seed started for a blob whose size is known")
	}
}

func TestSeedOffersOnlyUnspreadPiecesUnlessStarved(t *testing.T) {
	tr, _ := newTracker(t)
	tr.SetSize(digest, 4<<20, 1<<20)
	tr.SetSeedHave(digest, bits(4, 0, 1, 2, 3))
	// Another agent already holds pieces 0 and 1.
	tr.Serve(context.Background(), "other", &swarmproto.TrackerRequest{
		Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4, 0, 1), Want: -1,
	})
	offer := seedPieces(t, poll(tr, "asker", bits(4), false))
	if len(offer) != 2 || offer[0] || offer[1] || !offer[2] || !offer[3] {
		t.Fatalf("offer %v, want exactly the unspread pieces 2 and 3", offer)
	}
	// Offers stick until spread.
	if again := seedPieces(t, poll(tr, "asker", bits(4), false)); len(again) != 2 || !again[2] || !again[3] {
		t.Fatalf("second offer %v changed", again)
	}
	// Starved: everything the seed has.
	if all := seedPieces(t, poll(tr, "asker", bits(4), true)); len(all) != 4 {
		t.Fatalf("starved offer %v, want all 4 pieces", all)
	}
}

func seedPieces(t *testing.T, resp *swarmproto.TrackerResponse) map[int]bool {
	t.Helper()
	for _, p := range resp.Peers {
		if p.Seed {
			b, err := piece.BitmapFromBytes(4, p.Have)
			if err != nil {
				t.Fatal(err)
			}
			out := map[int]bool{}
			for i := range 4 {
				if b.Has(i) {
					out[i] = true
				}
			}
			return out
		}
	}
	return nil
}

func TestSeedFailureIsReportedOnceThenRetried(t *testing.T) {
	tr, seeder := newTracker(t)
	poll(tr, "a", nil, true)
	if seeder.calls != 1 {
		t.Fatalf("seed started %d times, want 1", seeder.calls)
	}
	tr.Fail(digest, fmt.Errorf("upstream said no"), 401)
	resp := poll(tr, "a", nil, false)
	if resp.Error == "" || resp.Status != 401 {
		t.Fatalf("failure not reported: %+v", resp)
	}
	poll(tr, "a", nil, true)
	if seeder.calls != 2 {
		t.Fatalf("seed started %d times, want a retry after the reported failure", seeder.calls)
	}
}

// A blocked reader's piece is offered at once when nobody else has it or
// is getting it, so the client's response streams in order; when another
// agent holds it, the reader gets it from that agent instead.
func TestWantedPieceIsOfferedAtOnce(t *testing.T) {
	tr, _ := newTracker(t)
	tr.SetSize(digest, 4<<20, 1<<20)
	tr.SetSeedHave(digest, bits(4, 0, 1, 2, 3))
	tr.Serve(context.Background(), "other", &swarmproto.TrackerRequest{
		Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4, 3), Want: -1,
	})
	req := &swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app",
		Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4), Since: 1 << 60, Want: 0,
	}
	// No version reaches Since: without the wanted piece this poll would
	// wait for PollWait; the test's deadline is far shorter.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	resp := tr.Serve(ctx, "asker", req)
	if resp.Error != "" {
		t.Fatalf("poll with a wanted piece was not answered at once: %s", resp.Error)
	}
	if offer := seedPieces(t, resp); !offer[0] {
		t.Fatalf("offer %v lacks the wanted piece 0", offer)
	}
}

func TestWantedPieceHeldElsewhereIsNotOffered(t *testing.T) {
	tr, _ := newTracker(t)
	tr.SetSize(digest, 4<<20, 1<<20)
	tr.SetSeedHave(digest, bits(4, 0, 1, 2, 3))
	tr.Serve(context.Background(), "other", &swarmproto.TrackerRequest{
		Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4, 0), Want: -1,
	})
	resp := tr.Serve(context.Background(), "asker", &swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app",
		Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4), Want: 0,
	})
	if offer := seedPieces(t, resp); offer[0] {
		t.Fatalf("offer %v includes piece 0, which another agent holds", offer)
	}
}

func TestIdleSwarmsArePruned(t *testing.T) {
	h, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	now := time.Unix(1_000_000, 0)
	tr := New(Config{PeerTTL: time.Minute, Now: func() time.Time { return now }}, h, zaptest.NewLogger(t))
	tr.SetSize(digest, 4<<20, 1<<20)
	tr.Serve(context.Background(), "a", &swarmproto.TrackerRequest{
		Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Have: bits(4, 0), Want: -1,
	})
	before := len(tr.Status())
	now = now.Add(10 * time.Minute)
	other := "sha256:" + strings.Repeat("ef", 32)
	tr.Serve(context.Background(), "b", &swarmproto.TrackerRequest{
		Op: swarmproto.OpHave, Digest: other, Addrs: []string{"/ip4/127.0.0.1/tcp/1"}, Want: -1,
	})
	for _, b := range tr.Status() {
		if b.Digest == digest {
			t.Fatalf("idle swarm of %s survived (%d swarms before)", digest, before)
		}
	}
	if before != 1 {
		t.Fatalf("%d swarms before pruning, want 1", before)
	}
}
