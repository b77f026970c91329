package tracker

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

var (
	digest  = "sha256:" + strings.Repeat("cd", 32)
	t0      = time.Unix(1_000_000, 0)
	agentIP = netip.MustParseAddr("10.0.0.7")
)

func newState(cfg Config) *State {
	if cfg.MaxPeers == 0 {
		cfg.MaxPeers = 5
	}
	if cfg.SeedOffer == 0 {
		cfg.SeedOffer = 2
	}
	return NewState(cfg, "seed", []string{"/ip4/10.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001"}, rand.New(rand.NewPCG(1, 2)))
}

func bitmap(n int, set ...int) []byte {
	b := piece.NewBitmap(n)
	for _, i := range set {
		b.Set(i)
	}
	return b.Bytes()
}

func asker(id string) Asker { return Asker{ID: peer.ID(id), IP: agentIP} }

func pollReq(have []byte, want int) *swarmproto.TrackerRequest {
	return &swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app",
		Addrs: []string{"/ip4/10.0.0.7/tcp/4001"}, Have: have, Want: want,
	}
}

func haveReq(have []byte) *swarmproto.TrackerRequest {
	return &swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: digest, Addrs: []string{"/ip4/10.0.0.7/tcp/4001"}, Have: have, Want: -1}
}

// sized starts a swarm for digest by a poll and gives it 4 pieces of 1 MiB.
func sized(t *testing.T, st *State, seedHave ...int) {
	t.Helper()
	res := st.Handle(t0, asker("starter"), pollReq(nil, -1))
	if !res.Seed || res.Resp.Error != "" {
		t.Fatalf("first poll: seed %v, error %q", res.Seed, res.Resp.Error)
	}
	st.Handle(t0, asker("starter"), &swarmproto.TrackerRequest{Op: swarmproto.OpWithdraw, Digest: digest, Want: -1})
	st.SetSize(t0, digest, 4<<20, 1<<20)
	if len(seedHave) > 0 {
		st.SetSeedHave(t0, digest, bitmap(4, seedHave...))
	}
}

func seedOffer(t *testing.T, resp *swarmproto.TrackerResponse) map[int]bool {
	t.Helper()
	if resp.Error != "" {
		t.Fatalf("error answer: %s", resp.Error)
	}
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
	return map[int]bool{}
}

func TestPeersAreABoundedSubsetOfUsefulOnes(t *testing.T) {
	st := newState(Config{})
	sized(t, st)
	for i := range 12 {
		have := bitmap(4, 0) // nothing the asker lacks
		if i%2 == 0 {
			have = bitmap(4, 0, 1, 2, 3)
		}
		if r := st.Handle(t0, asker(fmt.Sprint("p", i)), haveReq(have)); r.Resp.Error != "" {
			t.Fatal(r.Resp.Error)
		}
	}
	resp := st.Handle(t0, asker("asker"), pollReq(bitmap(4, 0), -1)).Resp
	if resp.Error != "" {
		t.Fatal(resp.Error)
	}
	if len(resp.Peers) != 5 {
		t.Fatalf("%d peers, want the cap of 5", len(resp.Peers))
	}
	for _, p := range resp.Peers {
		if p.ID == peer.ID("asker").String() || string(p.Have) != string(bitmap(4, 0, 1, 2, 3)) {
			t.Fatalf("peer %s with %x is not useful to the asker", p.ID, p.Have)
		}
	}
}

// Fails on the old tracker, which handed a starved asker every piece of
// the seed: when answers are slow, every agent looks starved and the seed
// uploaded the blob a hundred times.
func TestSeedOffersOnlyUnspreadPiecesEvenWhenStarved(t *testing.T) {
	st := newState(Config{})
	sized(t, st, 0, 1, 2, 3)
	st.Handle(t0, asker("other"), haveReq(bitmap(4, 0, 1))) // holds 0 and 1
	offer := seedOffer(t, st.Handle(t0, asker("a"), pollReq(bitmap(4), -1)).Resp)
	if len(offer) != 2 || offer[0] || offer[1] || !offer[2] || !offer[3] {
		t.Fatalf("offer %v, want exactly the unspread pieces 2 and 3", offer)
	}
	if again := seedOffer(t, st.Handle(t0, asker("a"), pollReq(bitmap(4), -1)).Resp); len(again) != 2 || !again[2] || !again[3] {
		t.Fatalf("second offer %v changed: offers stick", again)
	}
	// Another asker is offered nothing: each piece is on offer once.
	if o := seedOffer(t, st.Handle(t0, asker("b"), pollReq(bitmap(4), -1)).Resp); len(o) != 0 {
		t.Fatalf("b was offered %v, pieces already on offer to a", o)
	}
	// Starved, b may share a's offers (one more copy each), never pieces
	// another agent holds, and c, starved too, gets nothing more.
	starved := pollReq(bitmap(4), -1)
	starved.Starved = true
	if o := seedOffer(t, st.Handle(t0, asker("b"), starved).Resp); len(o) != 2 || o[0] || o[1] {
		t.Fatalf("starved b was offered %v, want pieces 2 and 3 only", o)
	}
	if o := seedOffer(t, st.Handle(t0, asker("c"), starved).Resp); len(o) != 0 {
		t.Fatalf("starved c was offered %v: the seed would send pieces a third time", o)
	}
}

func TestSeedFailureIsReportedOnceThenRetried(t *testing.T) {
	st := newState(Config{})
	if res := st.Handle(t0, asker("a"), pollReq(nil, -1)); !res.Seed {
		t.Fatal("first poll did not start the seed")
	}
	if res := st.Handle(t0, asker("a"), pollReq(nil, -1)); res.Seed {
		t.Fatal("seed started twice while the first fetch runs")
	}
	st.Fail(t0, digest, errors.New("upstream said no"), http.StatusUnauthorized)
	res := st.Handle(t0, asker("a"), pollReq(nil, -1))
	if res.Resp.Error == "" || res.Resp.Status != http.StatusUnauthorized {
		t.Fatalf("failure not reported: %+v", res.Resp)
	}
	if res := st.Handle(t0, asker("a"), pollReq(nil, -1)); !res.Seed {
		t.Fatal("no retry after the reported failure")
	}
}

// A blocked reader's piece is offered at once when nobody else has it or
// is getting it, so the client's response streams in order; when another
// agent holds it, the reader gets it from that agent instead.
func TestWantedPieceIsOfferedUnlessHeldElsewhere(t *testing.T) {
	st := newState(Config{SeedOffer: 2})
	sized(t, st, 0, 1, 2, 3)
	st.Handle(t0, asker("other"), haveReq(bitmap(4, 1)))
	if o := seedOffer(t, st.Handle(t0, asker("a"), pollReq(bitmap(4), 2)).Resp); !o[2] {
		t.Fatalf("offer %v lacks the wanted piece 2", o)
	}
	if o := seedOffer(t, st.Handle(t0, asker("b"), pollReq(bitmap(4), 1)).Resp); o[1] {
		t.Fatalf("offer %v includes piece 1, which another agent holds", o)
	}
}

func TestIdleSwarmsArePruned(t *testing.T) {
	st := newState(Config{PeerTTL: time.Minute})
	sized(t, st)
	st.Handle(t0, asker("a"), haveReq(bitmap(4, 0)))
	if n := len(st.Status()); n != 1 {
		t.Fatalf("%d swarms, want 1", n)
	}
	other := pollReq(nil, -1)
	other.Digest = "sha256:" + strings.Repeat("ef", 32)
	st.Handle(t0.Add(10*time.Minute), asker("b"), other)
	for _, b := range st.Status() {
		if b.Digest == digest {
			t.Fatalf("idle swarm of %s survived", digest)
		}
	}
}

// Fails on the old tracker, which kept every have for any digest: 6,000
// messages took the supernode to 532 MB.
func TestOnlyAPollStartsASwarm(t *testing.T) {
	st := newState(Config{})
	resp := st.Handle(t0, asker("a"), haveReq(bitmap(4, 0))).Resp
	if resp.Error == "" || len(st.Status()) != 0 {
		t.Fatalf("a have for an unknown blob was kept (error %q, %d swarms)", resp.Error, len(st.Status()))
	}
}

func TestSeedingIsRateLimitedPerPeer(t *testing.T) {
	st := newState(Config{SeedBurst: 3, SeedRefill: time.Minute})
	poll := func(id string, k int) *swarmproto.TrackerResponse {
		r := pollReq(nil, -1)
		r.Digest = fmt.Sprintf("sha256:%064x", k)
		return st.Handle(t0, asker(id), r).Resp
	}
	for k := range 3 {
		if r := poll("greedy", k); r.Error != "" {
			t.Fatalf("poll %d refused: %s", k, r.Error)
		}
	}
	if r := poll("greedy", 3); r.Status != http.StatusTooManyRequests {
		t.Fatalf("fourth new blob within the burst: status %d, want 429", r.Status)
	}
	if r := poll("greedy", 0); r.Error != "" {
		t.Fatalf("a blob already tracked was refused: %s", r.Error)
	}
	if r := poll("modest", 4); r.Error != "" {
		t.Fatalf("another peer was refused: %s", r.Error)
	}
	if n := len(st.Status()); n != 4 {
		t.Fatalf("%d swarms, want 4", n)
	}
}

func TestMembershipIsBoundedPerPeerAndPerBlob(t *testing.T) {
	st := newState(Config{MaxBlobsPerPeer: 2, MaxPeersPerBlob: 3, MaxBlobs: 4})
	for k := range 3 {
		r := pollReq(nil, -1)
		r.Digest = fmt.Sprintf("sha256:%064x", k)
		resp := st.Handle(t0, asker("a"), r).Resp
		if (k < 2) != (resp.Error == "") {
			t.Fatalf("blob %d for a peer limited to 2: error %q", k, resp.Error)
		}
	}
	for k := range 4 {
		resp := st.Handle(t0, asker(fmt.Sprint("p", k)), pollReq(nil, -1)).Resp
		if (k < 3) != (resp.Error == "") {
			t.Fatalf("member %d of a blob limited to 3: error %q", k+1, resp.Error)
		}
	}
	for k := 10; k < 12; k++ {
		r := pollReq(nil, -1)
		r.Digest = fmt.Sprintf("sha256:%064x", k)
		resp := st.Handle(t0, asker(fmt.Sprint("q", k)), r).Resp
		if (k == 10) != (resp.Error == "") {
			t.Fatalf("blob %d of a tracker limited to 4: error %q", k, resp.Error)
		}
	}
}

// Fails on the old tracker, which passed announced addresses on as they
// were: an insider could send every agent to dial 127.0.0.1 ports.
func TestAnnouncedAddressesAreTheObservedOnes(t *testing.T) {
	st := newState(Config{})
	sized(t, st)
	liar := pollReq(bitmap(4, 0, 1, 2, 3), -1)
	liar.Addrs = []string{"/ip4/127.0.0.1/tcp/22", "/ip4/192.0.2.9/tcp/4001", "/dns4/example.com/tcp/80"}
	st.Handle(t0, Asker{ID: "liar", IP: netip.MustParseAddr("10.0.0.66")}, liar)
	local := pollReq(bitmap(4, 0, 1, 2, 3), -1)
	local.Addrs = []string{"/ip4/127.0.0.1/tcp/5555"}
	st.Handle(t0, Asker{ID: "local", IP: netip.MustParseAddr("127.0.0.1")}, local)

	resp := st.Handle(t0, asker("a"), pollReq(bitmap(4), -1)).Resp
	if len(resp.Peers) != 1 || resp.Peers[0].ID != peer.ID("liar").String() {
		t.Fatalf("peers %+v: want only the non-loopback one", resp.Peers)
	}
	got := strings.Join(resp.Peers[0].Addrs, " ")
	if got != "/ip4/10.0.0.66/tcp/22 /ip4/10.0.0.66/tcp/4001" {
		t.Fatalf("addresses %q, want the announced ports on the observed IP only", got)
	}
	for _, p := range resp.Peers {
		for _, a := range p.Addrs {
			if strings.Contains(a, "127.0.0.1") {
				t.Fatalf("loopback address %s handed to a remote asker", a)
			}
		}
	}
	// A loopback asker (one machine) does get the loopback peer.
	resp = st.Handle(t0, Asker{ID: "b", IP: netip.MustParseAddr("127.0.0.1")}, pollReq(bitmap(4), -1)).Resp
	if len(resp.Peers) != 2 {
		t.Fatalf("loopback asker got %d peers, want 2", len(resp.Peers))
	}
}

// Fails on the old tracker: a peer that announced a piece it could not
// serve kept it counted, so the seed never offered its own copy and askers
// stalled until they went to the registry.
func TestClaimThatFailsIsDroppedAndTheSeedOffersThePiece(t *testing.T) {
	st := newState(Config{})
	sized(t, st, 0, 1, 2, 3)
	st.Handle(t0, asker("liar"), haveReq(bitmap(4, 0, 1, 2, 3)))
	if o := seedOffer(t, st.Handle(t0, asker("a"), pollReq(bitmap(4), 0)).Resp); len(o) != 0 {
		t.Fatalf("offer %v while another agent claims every piece", o)
	}
	r := pollReq(bitmap(4), 0)
	r.Failed = []swarmproto.Failure{{Peer: peer.ID("liar").String(), Piece: 0}}
	resp := st.Handle(t0, asker("a"), r).Resp
	if o := seedOffer(t, resp); !o[0] {
		t.Fatalf("offer %v lacks piece 0, whose only holder failed", o)
	}
	// The liar's other claims still stand.
	if len(resp.Peers) != 2 {
		t.Fatalf("%d peers, want the seed and the liar (it claims 1-3)", len(resp.Peers))
	}
}

func TestCorruptPeerAndWithdrawnBlobLeaveTheSwarm(t *testing.T) {
	st := newState(Config{})
	sized(t, st)
	st.Handle(t0, asker("bad"), haveReq(bitmap(4, 0, 1, 2, 3)))
	st.Handle(t0, asker("evicted"), haveReq(bitmap(4, 0, 1, 2, 3)))
	if resp := st.Handle(t0, asker("a"), pollReq(bitmap(4), -1)).Resp; len(resp.Peers) != 2 {
		t.Fatalf("%d peers, want 2", len(resp.Peers))
	}
	st.Handle(t0, asker("evicted"), &swarmproto.TrackerRequest{Op: swarmproto.OpWithdraw, Digest: digest, Want: -1})
	r := pollReq(bitmap(4), -1)
	r.Failed = []swarmproto.Failure{{Peer: peer.ID("bad").String(), Piece: 2, Corrupt: true}}
	if resp := st.Handle(t0, asker("a"), r).Resp; len(resp.Peers) != 0 {
		t.Fatalf("peers %+v remain after a withdrawal and a corrupt piece", resp.Peers)
	}
	if s := st.Status(); s[0].Peers != 1 {
		t.Fatalf("%d members, want only the asker", s[0].Peers)
	}
}

func TestBackToSourcePermitsAreBounded(t *testing.T) {
	st := newState(Config{Permits: 2, PermitLease: time.Minute, PermitQuiet: 10 * time.Second})
	sized(t, st)
	t1 := t0.Add(time.Minute) // the swarm has been quiet since t0
	ask := func(id string, now time.Time) bool {
		resp := st.Handle(now, asker(id), &swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Digest: digest, Want: -1}).Resp
		if resp.Error != "" {
			t.Fatal(resp.Error)
		}
		return resp.Permit
	}
	if !ask("a", t1) || !ask("b", t1) {
		t.Fatal("the first two askers got no permit")
	}
	if ask("c", t1) {
		t.Fatal("a third permit was granted while two leases run")
	}
	if !ask("a", t1) {
		t.Fatal("a holder could not renew its lease")
	}
	st.Handle(t1, asker("a"), &swarmproto.TrackerRequest{Op: swarmproto.OpRelease, Digest: digest, Want: -1})
	if !ask("c", t1) {
		t.Fatal("no permit after a release")
	}
	if ask("d", t1.Add(30*time.Second)) {
		t.Fatal("permit granted before any lease ended")
	}
	// b completes: a complete member needs no permit, and the swarm moved.
	st.Handle(t1.Add(30*time.Second), asker("b"), haveReq(bitmap(4, 0, 1, 2, 3)))
	if ask("d", t1.Add(30*time.Second)) {
		t.Fatal("permit granted while the swarm is progressing")
	}
	if !ask("d", t1.Add(45*time.Second)) {
		t.Fatal("no permit once the swarm was quiet again and a lease was free")
	}
	if !ask("e", t1.Add(3*time.Minute)) {
		t.Fatal("no permit after every lease expired")
	}
}

// A swarm that keeps gaining pieces is slow, not dead: nobody goes to the
// registry while it does, except an asker refused for PermitWait.
func TestProgressingSwarmGrantsNoPermitUntilTheWaitRunsOut(t *testing.T) {
	st := newState(Config{PermitQuiet: 10 * time.Second, PermitWait: 2 * time.Minute})
	sized(t, st)
	ask := func(now time.Time) bool {
		return st.Handle(now, asker("stuck"), &swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Digest: digest, Want: -1}).Resp.Permit
	}
	for k := range 12 { // a piece every 10 s somewhere in the swarm
		now := t0.Add(time.Duration(k) * 10 * time.Second)
		st.Handle(now, asker(fmt.Sprint("p", k)), haveReq(bitmap(4, k%4)))
		if ask(now.Add(time.Second)) {
			t.Fatalf("permit granted %v into a progressing swarm", now.Add(time.Second).Sub(t0))
		}
	}
	if !ask(t0.Add(2*time.Minute + 2*time.Second)) {
		t.Fatal("an asker refused for 2 min still got no permit")
	}
}

// An asker that keeps gaining pieces itself is slow, not stuck: the
// PermitWait permit is for an asker that gained nothing since its first
// refusal. Fails before (in the 100-process CPU-starved storm, agents
// refused at the start got permits 2 minutes in while they and the swarm
// progressed: 11 of 18 permit fallbacks came 2:00-2:20 after the first
// refusals).
func TestAskerThatGainsPiecesGetsNoWaitPermit(t *testing.T) {
	st := newState(Config{PermitQuiet: 10 * time.Second, PermitWait: 2 * time.Minute})
	sized(t, st)
	ask := func(now time.Time) bool {
		return st.Handle(now, asker("slow"), &swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Digest: digest, Want: -1}).Resp.Permit
	}
	for k := range 3 { // the asker gains a piece every 50 s, others too
		now := t0.Add(time.Duration(k) * 50 * time.Second)
		st.Handle(now, asker("slow"), haveReq(bitmap(4, seq(k+1)...)))
		for j := range 5 {
			other := now.Add(time.Duration(j) * 10 * time.Second)
			st.Handle(other, asker(fmt.Sprint("p", k, j)), haveReq(bitmap(4, j%4)))
			if ask(other.Add(time.Second)) {
				t.Fatalf("permit granted %v in to an asker that gains pieces", other.Add(time.Second).Sub(t0))
			}
		}
	}
	// Then it gains nothing for 2 min while the swarm moves on: stuck.
	last := t0.Add(2*50*time.Second + 41*time.Second)
	for k := range 13 {
		now := last.Add(time.Duration(k) * 10 * time.Second)
		st.Handle(now, asker(fmt.Sprint("q", k)), haveReq(bitmap(4, k%4)))
	}
	if !ask(last.Add(2*time.Minute + 2*time.Second)) {
		t.Fatal("an asker that gained nothing for 2 min of refusals got no permit")
	}
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

func TestIntervalGrowsWithTheSwarm(t *testing.T) {
	st := newState(Config{BlobRate: 2000, TotalRate: 1e9, MinInterval: 100 * time.Millisecond, MaxInterval: 10 * time.Second})
	sized(t, st)
	iv := func() time.Duration {
		return time.Duration(st.Handle(t0, asker("p0"), haveReq(nil)).Resp.Interval) * time.Millisecond
	}
	for k := range 10_000 {
		st.Handle(t0, asker(fmt.Sprint("p", k)), haveReq(nil))
		switch k + 1 {
		case 100:
			if d := iv(); d < 90*time.Millisecond || d > 110*time.Millisecond {
				t.Fatalf("interval %v at 100 peers, want ~100ms", d)
			}
		case 10_000:
			if d := iv(); d < 4500*time.Millisecond || d > 5500*time.Millisecond {
				t.Fatalf("interval %v at 10,000 peers, want ~5s", d)
			}
		}
	}
}

func TestSeedProgressIsNewsOnlyWhenItChanges(t *testing.T) {
	st := newState(Config{})
	sized(t, st, 0)
	v := st.Handle(t0, asker("a"), haveReq(nil)).Resp.Version
	st.SetSeedHave(t0, digest, bitmap(4, 0))
	if v2 := st.Handle(t0, asker("a"), haveReq(nil)).Resp.Version; v2 != v {
		t.Fatalf("version moved %d -> %d on an unchanged seed bitmap", v, v2)
	}
	st.SetSeedHave(t0, digest, bitmap(4, 0, 1))
	if v2 := st.Handle(t0, asker("a"), haveReq(nil)).Resp.Version; v2 == v {
		t.Fatal("version did not move when the seed gained a piece")
	}
}

// Fails on the old tracker, which kept advertising a blob the supernode's
// store had evicted until its swarm was pruned.
func TestSeedThatLostTheBlobStopsOfferingItAndSeedsAgain(t *testing.T) {
	st := newState(Config{})
	sized(t, st)
	cids := make([]cid.Cid, 4)
	for i := range cids {
		cids[i] = piece.CID([]byte{byte(i)})
	}
	st.SetMetainfo(t0, &piece.Metainfo{Digest: digest, Size: 4 << 20, PieceSize: 1 << 20, Pieces: cids}, bitmap(4, 0, 1, 2, 3))
	if o := seedOffer(t, st.Handle(t0, asker("a"), pollReq(bitmap(4), -1)).Resp); len(o) == 0 {
		t.Fatal("no seed offer for a blob the seed holds")
	}
	st.SeedGone(t0, digest)
	res := st.Handle(t0, asker("a"), pollReq(bitmap(4), -1))
	if o := seedOffer(t, res.Resp); len(o) != 0 {
		t.Fatalf("seed offered %v of a blob it no longer holds", o)
	}
	if !res.Seed {
		t.Fatal("the seed was not started again")
	}
	if res.Resp.Size != 4<<20 || len(st.Handle(t0, asker("b"), pollReq(nil, -1)).Resp.Pieces) != 4 {
		t.Fatal("the piece table was lost with the seed's copy")
	}
}

func TestIntervalStretchesUnderPressure(t *testing.T) {
	st := newState(Config{MinInterval: 100 * time.Millisecond, MaxInterval: 10 * time.Second})
	sized(t, st)
	iv := func() time.Duration {
		return time.Duration(st.Handle(t0, asker("a"), haveReq(nil)).Resp.Interval) * time.Millisecond
	}
	if d := iv(); d > 110*time.Millisecond {
		t.Fatalf("interval %v for a lone agent, want ~100ms", d)
	}
	st.SetPressure(80) // ten times what the tracker answers freely
	if d := iv(); d < 900*time.Millisecond || d > 1100*time.Millisecond {
		t.Fatalf("interval %v with 80 requests in hand, want ~1s", d)
	}
}

func TestIntervalCountsOnlyMembersStillDownloading(t *testing.T) {
	st := newState(Config{BlobRate: 2000, TotalRate: 1e9, MinInterval: 100 * time.Millisecond, MaxInterval: 10 * time.Second})
	sized(t, st) // 4 pieces
	all := bitmap(4, 0, 1, 2, 3)
	iv := func(have []byte) time.Duration {
		return time.Duration(st.Handle(t0, asker("p0"), haveReq(have)).Resp.Interval) * time.Millisecond
	}
	for k := range 4000 {
		st.Handle(t0, asker(fmt.Sprint("p", k)), haveReq(nil))
	}
	if d := iv(nil); d < 1800*time.Millisecond || d > 2200*time.Millisecond {
		t.Fatalf("interval %v with 4,000 downloading, want ~2s", d)
	}
	// Three quarters finish: they ask no more, so the rest may ask sooner.
	for k := 1000; k < 4000; k++ {
		st.Handle(t0, asker(fmt.Sprint("p", k)), haveReq(all))
	}
	if d := iv(nil); d < 450*time.Millisecond || d > 550*time.Millisecond {
		t.Fatalf("interval %v with 1,000 of 4,000 downloading, want ~500ms", d)
	}
	// One that was complete is not any more (a geometry restart, or an
	// announce with less): it counts again.
	for k := 1000; k < 2000; k++ {
		st.Handle(t0, asker(fmt.Sprint("p", k)), haveReq(bitmap(4, 0)))
	}
	if d := iv(nil); d < 900*time.Millisecond || d > 1100*time.Millisecond {
		t.Fatalf("interval %v with 2,000 of 4,000 downloading, want ~1s", d)
	}
}
