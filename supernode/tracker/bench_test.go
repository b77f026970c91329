package tracker

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// BenchmarkRequest pins the cost of one tracker request at N = 100, 1,000
// and 10,000 agents in a blob's swarm (512 MiB in 128 pieces of 4 MiB,
// each agent holding a random half, the seed the whole blob): a poll (the
// answer with up to 16 peers and the seed's offer) followed by a have (a
// bitmap that changed by one piece). The old tracker cost 0.14 ms, 1.8 ms
// and 19.9 ms per poll here; the figure must stay flat as N grows.
func BenchmarkRequest(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprint("N=", n), func(b *testing.B) {
			const pieces = 128
			st := NewState(Config{}, "seed", []string{"/ip4/10.0.0.1/tcp/4001"}, rand.New(rand.NewPCG(1, 2)))
			now := time.Unix(1_000_000, 0)
			ip := netip.MustParseAddr("10.0.0.2")
			first := &swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app", Want: -1}
			st.Handle(now, Asker{ID: "starter", IP: ip}, first)
			st.SetSize(now, digest, pieces<<22, 4<<20)
			all := piece.NewBitmap(pieces)
			for i := range pieces {
				all.Set(i)
			}
			st.SetSeedHave(now, digest, all.Bytes())
			rng := rand.New(rand.NewPCG(3, 4))
			ids := make([]peer.ID, n)
			haves := make([]piece.Bitmap, n)
			for k := range n {
				ids[k] = peer.ID(fmt.Sprintf("peer-%06d", k))
				haves[k] = piece.NewBitmap(pieces)
				for i := range pieces {
					if rng.IntN(2) == 0 {
						haves[k].Set(i)
					}
				}
				st.Handle(now, Asker{ID: ids[k], IP: ip}, &swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest,
					Registry: "docker.io", Repo: "library/app", Addrs: []string{"/ip4/10.0.0.2/tcp/4001"}, Have: haves[k].Bytes(), Known: pieces, Want: -1})
			}
			b.ResetTimer()
			for k := 0; k < b.N; k++ {
				p := k % n
				res := st.Handle(now, Asker{ID: ids[p], IP: ip}, &swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest,
					Registry: "docker.io", Repo: "library/app", Addrs: []string{"/ip4/10.0.0.2/tcp/4001"},
					Have: haves[p].Bytes(), Known: pieces, Want: -1})
				if res.Resp.Error != "" || len(res.Resp.Peers) == 0 {
					b.Fatalf("poll answered %q with %d peers", res.Resp.Error, len(res.Resp.Peers))
				}
				haves[p].Set(rng.IntN(pieces))
				st.Handle(now, Asker{ID: ids[p], IP: ip}, &swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: digest,
					Addrs: []string{"/ip4/10.0.0.2/tcp/4001"}, Have: haves[p].Bytes(), Want: -1})
			}
		})
	}
}

// BenchmarkPollOverLibp2p is one poll through the real driver: a stream
// opened by a second host on loopback, the request and answer framed as
// JSON, 10,000 members in the swarm. Both ends run in this process, so the
// figure is the CPU of a whole exchange (client and tracker).
func BenchmarkPollOverLibp2p(b *testing.B) {
	server, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer server.Close()
	client, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	tr := New(Config{}, server, zap.NewNop())
	tr.Register()
	const pieces, n = 128, 10000
	now := time.Now()
	ip := netip.MustParseAddr("10.0.0.2")
	st := tr.State()
	st.Handle(now, Asker{ID: "starter", IP: ip}, &swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io", Repo: "library/app", Want: -1})
	st.SetSize(now, digest, pieces<<22, 4<<20)
	rng := rand.New(rand.NewPCG(3, 4))
	for k := range n {
		bm := piece.NewBitmap(pieces)
		for i := range pieces {
			if rng.IntN(2) == 0 {
				bm.Set(i)
			}
		}
		st.Handle(now, Asker{ID: peer.ID(fmt.Sprintf("peer-%06d", k)), IP: ip}, &swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: digest,
			Addrs: []string{"/ip4/10.0.0.2/tcp/4001"}, Have: bm.Bytes(), Want: -1})
	}
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}); err != nil {
		b.Fatal(err)
	}
	have := piece.NewBitmap(pieces).Bytes()
	b.ResetTimer()
	for range b.N {
		s, err := client.NewStream(context.Background(), server.ID(), swarmproto.TrackerProtocol)
		if err != nil {
			b.Fatal(err)
		}
		if err := wire.WriteMsg(s, swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest, Registry: "docker.io",
			Repo: "library/app", Addrs: []string{"/ip4/127.0.0.1/tcp/4001"}, Have: have, Known: pieces, Want: -1}); err != nil {
			b.Fatal(err)
		}
		var resp swarmproto.TrackerResponse
		if err := wire.ReadMsg(s, &resp, swarmproto.MaxResponseBytes); err != nil || len(resp.Peers) == 0 {
			b.Fatalf("poll: %v, %d peers", err, len(resp.Peers))
		}
		s.Close()
	}
}
