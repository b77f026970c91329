package swarm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/agent/swarm"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/rendezvous"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/supernode"
)

const testPieceSize = 256 << 10

func swarmKey(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "swarm.key")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := p2p.GenerateSwarmKey(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path
}

func startSupernode(t testing.TB, key, registry string, uploadRate int64) *supernode.Supernode {
	t.Helper()
	cfg := supernode.DefaultConfig()
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.SwarmKey = key
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{registry}}
	cfg.PieceSize = testPieceSize
	cfg.UploadRate = config.Bytes(uploadRate)
	sn, err := supernode.New(cfg, zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)).Named("supernode"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return sn
}

type node struct {
	agent *agent.Agent
	srv   *httptest.Server
}

func startAgent(t testing.TB, key, registry string, supernodes []string, mutate func(*agent.Config)) *node {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{registry}}
	cfg.Supernodes = config.Strings{Values: supernodes}
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.SwarmKey = key
	// Long enough that a passing test shows the swarm worked, not the fallback.
	cfg.StallTimeout = config.Duration(30 * time.Second)
	if mutate != nil {
		mutate(&cfg)
	}
	a, err := agent.New(cfg, zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)).Named("agent"))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		a.Close()
	})
	return &node{agent: a, srv: srv}
}

// pull fetches the image through a mirror and checks every blob's digest.
func pull(mirror, repoTag string) error {
	ref, err := name.ParseReference(strings.TrimPrefix(mirror, "http://")+"/"+repoTag, name.Insecure)
	if err != nil {
		return err
	}
	img, err := remote.Image(ref)
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		want, _ := l.Digest()
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		h := sha256.New()
		_, err = io.Copy(h, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("layer %s: %w", want, err)
		}
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != want.String() {
			return fmt.Errorf("layer %s arrived as %s", want, got)
		}
	}
	_, err = img.RawConfigFile()
	return err
}

func blobBytes(t testing.TB, img v1.Image) int64 {
	t.Helper()
	layers, _ := img.Layers()
	var n int64
	for _, l := range layers {
		s, _ := l.Size()
		n += s
	}
	cfg, _ := img.RawConfigFile()
	return n + int64(len(cfg))
}

func pullAll(t *testing.T, nodes []*node, repoTag string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(nodes))
	for _, n := range nodes {
		wg.Go(func() {
			if err := pull(n.srv.URL, repoTag); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func assertOneFetchPerBlob(t *testing.T, up *testregistry.Registry, img v1.Image) {
	t.Helper()
	gets := up.BlobGETs()
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		if gets[d.String()] != 1 {
			t.Errorf("layer %s fetched from upstream %d times, want 1", d, gets[d.String()])
		}
	}
	for d, n := range gets {
		if n != 1 {
			t.Errorf("blob %s fetched from upstream %d times, want 1", d, n)
		}
	}
}

func TestSixAgentsPullOnceFromUpstream(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "team/app:v1", 3, 2<<20)
	key := swarmKey(t)
	// A slow seed makes the agents trade pieces instead of all taking
	// everything from the supernode.
	sn := startSupernode(t, key, up.URL(), 16<<20)
	var nodes []*node
	for range 6 {
		nodes = append(nodes, startAgent(t, key, up.URL(), sn.Addrs(), nil))
	}
	pullAll(t, nodes, "team/app:v1")
	assertOneFetchPerBlob(t, up, img)

	var fromPeers, fromSeed, fromUpstream int64
	for _, n := range nodes {
		s := n.agent.Stats()
		fromPeers += s.FromPeers
		fromSeed += s.FromSeed
		fromUpstream += s.FromUpstream
	}
	layers, _ := img.Layers()
	var layerBytes int64
	for _, l := range layers {
		s, _ := l.Size()
		layerBytes += s
	}
	t.Logf("from peers %d, from seed %d, from upstream %d (6 x %d blob bytes)", fromPeers, fromSeed, fromUpstream, blobBytes(t, img))
	if fromUpstream != 0 {
		t.Errorf("agents fetched %d bytes from upstream themselves", fromUpstream)
	}
	if fromPeers+fromSeed < 6*layerBytes {
		t.Errorf("agents got %d bytes over the swarm, want at least %d", fromPeers+fromSeed, 6*layerBytes)
	}
	if fromPeers == 0 {
		t.Error("no piece came from another agent")
	}
	// The agents watched each other's bitmaps over real libp2p streams.
	var news int64
	for _, n := range nodes {
		news += n.agent.WatchNews()
	}
	if news == 0 {
		t.Error("no agent heard from a peer it watched")
	}
}

// corruptPeer is a libp2p host that claims every piece and serves garbage.
type corruptPeer struct {
	served atomic.Int64
}

func startCorruptPeer(t *testing.T, key, registry string, sn *supernode.Supernode, digests map[string]int64) *corruptPeer {
	t.Helper()
	h, err := p2p.NewHost(p2p.Config{SwarmKeyFile: key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	cp := &corruptPeer{}
	h.SetStreamHandler(swarmproto.PieceProtocol, func(s network.Stream) {
		defer s.Close()
		var req swarmproto.PieceRequest
		if wire.ReadMsg(s, &req, 4096) != nil {
			return
		}
		_, length := piece.Bounds(req.Index, digests[req.Digest], req.PieceSize)
		cp.served.Add(1)
		_ = wire.WriteMsg(s, swarmproto.PieceHeader{Size: length})
		_, _ = s.Write(bytes.Repeat([]byte{0xAB}, int(length)))
	})
	snInfo, err := p2p.ParsePeerAddr(sn.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Connect(context.Background(), snInfo); err != nil {
		t.Fatal(err)
	}
	// Announce a full bitmap for every blob, as a lying peer would.
	for digest, size := range digests {
		all := piece.NewBitmap(piece.Count(size, testPieceSize))
		for i := range all.Len() {
			all.Set(i)
		}
		var addrs []string
		for _, a := range h.Addrs() {
			addrs = append(addrs, a.String())
		}
		// Join as agents do (only a poll starts a swarm), wait for the
		// seed to learn the size, then claim everything.
		for {
			resp := trackerCall(t, h, snInfo.ID, swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: digest,
				Registry: registry, Repo: "app", Addrs: addrs, Want: -1})
			if resp.Size >= 0 {
				break
			}
			<-time.After(time.Duration(resp.Interval) * time.Millisecond)
		}
		trackerCall(t, h, snInfo.ID, swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: digest, Addrs: addrs, Have: all.Bytes(), Want: -1})
	}
	return cp
}

// trackerCall sends one tracker request from h and returns the answer.
func trackerCall(t *testing.T, h host.Host, to peer.ID, req swarmproto.TrackerRequest) *swarmproto.TrackerResponse {
	t.Helper()
	s, err := h.NewStream(context.Background(), to, swarmproto.TrackerProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := wire.WriteMsg(s, req); err != nil {
		t.Fatal(err)
	}
	var resp swarmproto.TrackerResponse
	if err := wire.ReadMsg(s, &resp, 1<<20); err != nil || resp.Error != "" {
		t.Fatalf("%s: %v %s", req.Op, err, resp.Error)
	}
	return &resp
}

func TestCorruptPeerIsDetectedAndPullSucceeds(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 1<<20)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 8<<20)
	digests := map[string]int64{}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		s, _ := l.Size()
		digests[d.String()] = s
	}
	cp := startCorruptPeer(t, key, up.Host(), sn, digests)
	n := startAgent(t, key, up.URL(), sn.Addrs(), nil)
	if err := pull(n.srv.URL, "app:v1"); err != nil {
		t.Fatal(err)
	}
	if cp.served.Load() == 0 {
		t.Fatal("the corrupt peer was never asked, so the test proved nothing")
	}
	if s := n.agent.Stats(); s.FromUpstream != 0 {
		t.Errorf("agent fell back to upstream (%d bytes); want the swarm to route around the bad peer", s.FromUpstream)
	}
	assertOneFetchPerBlob(t, up, img)
}

func TestWrongSwarmKeyCannotJoinButPullSucceeds(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 512<<10)
	sn := startSupernode(t, swarmKey(t), up.URL(), 0)
	n := startAgent(t, swarmKey(t), up.URL(), sn.Addrs(), nil)
	if err := pull(n.srv.URL, "app:v1"); err != nil {
		t.Fatal(err)
	}
	agentID, err := peer.Decode(n.agent.P2PID())
	if err != nil {
		t.Fatal(err)
	}
	if sn.Host().Network().Connectedness(agentID) == network.Connected {
		t.Fatal("agent with the wrong swarm key is connected to the supernode")
	}
	s := n.agent.Stats()
	if s.FromPeers+s.FromSeed != 0 || s.FromUpstream < blobBytes(t, img)-2048 {
		t.Fatalf("stats %+v: want everything from upstream", s)
	}
	if sn.SeedFetches() != 0 {
		t.Fatalf("supernode seeded %d blobs for an outsider", sn.SeedFetches())
	}
}

func TestNoSupernodeFallsBackToUpstream(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 512<<10)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	addrs := sn.Addrs()
	sn.Close()
	n := startAgent(t, key, up.URL(), addrs, nil)
	if err := pull(n.srv.URL, "app:v1"); err != nil {
		t.Fatal(err)
	}
	assertOneFetchPerBlob(t, up, img)
	if s := n.agent.Stats(); s.FromUpstream == 0 {
		t.Fatal("no bytes came from upstream")
	}
}

func TestTwoSupernodesSplitOwnership(t *testing.T) {
	up := testregistry.New(t)
	key := swarmKey(t)
	a := startSupernode(t, key, up.URL(), 0)
	b := startSupernode(t, key, up.URL(), 0)
	ids := []string{a.Host().ID().String(), b.Host().ID().String()}
	// Push until the image's blobs have owners on both supernodes.
	var img v1.Image
	owned := map[string]int{}
	for try := 0; try < 20 && (owned[ids[0]] == 0 || owned[ids[1]] == 0); try++ {
		img = up.Push(t, "app:v1", 4, 256<<10)
		owned = map[string]int{}
		layers, _ := img.Layers()
		for _, l := range layers {
			d, _ := l.Digest()
			owned[rendezvous.Rank(d.String(), ids)[0]]++
		}
		cfgName, _ := img.ConfigName()
		owned[rendezvous.Rank(cfgName.String(), ids)[0]]++
	}
	addrs := append(a.Addrs(), b.Addrs()...)
	var nodes []*node
	for range 4 {
		nodes = append(nodes, startAgent(t, key, up.URL(), addrs, nil))
	}
	pullAll(t, nodes, "app:v1")
	assertOneFetchPerBlob(t, up, img)
	if a.SeedFetches() != owned[ids[0]] || b.SeedFetches() != owned[ids[1]] {
		t.Fatalf("seed fetches %d and %d, want %d and %d by rendezvous ownership", a.SeedFetches(), b.SeedFetches(), owned[ids[0]], owned[ids[1]])
	}
}

// The client gets the first bytes of a blob long before the whole blob
// has crossed the swarm: pieces near the reader come first.
func TestResponseStreamsInOrder(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 16<<20)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 8<<20) // about 2 s for the blob
	n := startAgent(t, key, up.URL(), sn.Addrs(), nil)
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	resp, err := http.Get(n.srv.URL + "/v2/app/blobs/" + digest.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.ReadFull(resp.Body, make([]byte, 256<<10)); err != nil {
		t.Fatal(err)
	}
	if got := n.agent.Stats().FromSeed; got > size/2 {
		t.Fatalf("first bytes reached the client only after %d of %d bytes arrived", got, size)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		t.Fatal(err)
	}
}

// When the owning supernode dies mid-download, agents carry on with the
// next one by rendezvous order: the registry serves the blob once more,
// not once per agent.
func TestOwnerLostMidDownloadFailsOver(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 8<<20)
	key := swarmKey(t)
	a := startSupernode(t, key, up.URL(), 4<<20)
	b := startSupernode(t, key, up.URL(), 4<<20)
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	owner, other := a, b
	if rendezvous.Rank(digest.String(), []string{a.Host().ID().String(), b.Host().ID().String()})[0] != a.Host().ID().String() {
		owner, other = b, a
	}
	addrs := append(a.Addrs(), b.Addrs()...)
	var nodes []*node
	for range 3 {
		nodes = append(nodes, startAgent(t, key, up.URL(), addrs, nil))
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(nodes))
	for _, n := range nodes {
		wg.Go(func() {
			resp, err := http.Get(n.srv.URL + "/v2/app/blobs/" + digest.String())
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			h := sha256.New()
			if _, err := io.Copy(h, resp.Body); err != nil {
				errs <- err
				return
			}
			if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest.String() {
				errs <- fmt.Errorf("got %s", got)
			}
		})
	}
	// Kill the owner once pieces are flowing from it.
	deadline := time.Now().Add(20 * time.Second)
	for owner.BytesServed() == 0 && time.Now().Before(deadline) {
		<-time.After(10 * time.Millisecond) // polling a counter; nothing to wait on
	}
	if owner.BytesServed() == 0 {
		t.Fatal("the owner never served a piece")
	}
	owner.Close()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := up.BlobGETs()[digest.String()]; got != 2 {
		t.Errorf("layer fetched from upstream %d times, want 2 (the lost owner and its successor)", got)
	}
	if other.SeedFetches() != 1 {
		t.Errorf("successor seeded %d times, want 1", other.SeedFetches())
	}
	for _, n := range nodes {
		if s := n.agent.Stats(); s.FromUpstream != 0 {
			t.Errorf("an agent fetched %d bytes from upstream itself", s.FromUpstream)
		}
	}
}

// trackedPeers reads the supernode's /status: members of digest's swarm.
func trackedPeers(t *testing.T, sn *supernode.Supernode, digest string) int {
	t.Helper()
	srv := httptest.NewServer(sn.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var status struct {
		Blobs []struct {
			Digest string `json:"digest"`
			Peers  int    `json:"peers"`
		} `json:"blobs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&status); err != nil {
		t.Fatal(err)
	}
	for _, b := range status.Blobs {
		if b.Digest == digest {
			return b.Peers
		}
	}
	return 0
}

// An agent that no longer holds a blob withdraws it: the tracker stops
// handing it out as a source.
func TestWithdrawnBlobLeavesTheTracker(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 1<<20)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	layers, _ := img.Layers()
	d, _ := layers[0].Digest()
	n := startAgent(t, key, up.URL(), sn.Addrs(), nil)
	if err := pull(n.srv.URL, "app:v1"); err != nil {
		t.Fatal(err)
	}

	h, err := p2p.NewHost(p2p.Config{SwarmKeyFile: key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	snInfo, err := p2p.ParsePeerAddr(sn.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	sw := swarm.New(swarm.Config{Supernodes: []peer.AddrInfo{snInfo}}, h, nil, nil, zaptest.NewLogger(t))
	trackerCall(t, h, snInfo.ID, swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: d.String(), Registry: up.Host(),
		Repo: "app", Addrs: []string{h.Addrs()[0].String()}, Want: -1})
	if got := trackedPeers(t, sn, d.String()); got != 2 {
		t.Fatalf("%d members before the withdrawal, want the agent and the joiner", got)
	}
	if err := sw.Withdraw(context.Background(), d.String()); err != nil {
		t.Fatal(err)
	}
	if got := trackedPeers(t, sn, d.String()); got != 1 {
		t.Fatalf("%d members after the withdrawal, want 1", got)
	}
}

// permitStatus reads the supernode's /status: back-to-source permits
// refused for digest.
func permitsDenied(t *testing.T, sn *supernode.Supernode, digest string) int {
	t.Helper()
	srv := httptest.NewServer(sn.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var status struct {
		Blobs []struct {
			Digest string `json:"digest"`
			Denied int    `json:"permits_denied"`
		} `json:"blobs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&status); err != nil {
		t.Fatal(err)
	}
	for _, b := range status.Blobs {
		if b.Digest == digest {
			return b.Denied
		}
	}
	return 0
}

// A seed stuck on a slow upstream is a slow swarm, not a dead one: agents
// that wait past --stall-timeout ask the owner for a back-to-source permit,
// at most two fetch from upstream at once, and the others keep waiting.
// Before permits every agent went to upstream after the stall timeout.
func TestSlowSeedBoundsBackToSource(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 256<<10)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	hold := make(chan struct{})
	var inflight, peak atomic.Int64
	up.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
			return false
		}
		// The seed's GET and the agents' look alike upstream: count them all.
		n := inflight.Add(1)
		defer inflight.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		select { // everyone's layer GET waits until the test has looked
		case <-hold:
		case <-r.Context().Done():
			return true
		}
		return false
	})
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	errs := make(chan error, 3)
	for range 3 {
		n := startAgent(t, key, up.URL(), sn.Addrs(), func(c *agent.Config) { c.StallTimeout = config.Duration(time.Second) })
		go func() { errs <- pull(n.srv.URL, "app:v1") }()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for permitsDenied(t, sn, ld.String()) == 0 || inflight.Load() < 3 {
		select {
		case <-tick.C:
		case <-deadline:
			close(hold)
			t.Fatalf("no permit refused (%d layer GETs in flight, the seed's included)", inflight.Load())
		}
	}
	close(hold)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if p := peak.Load(); p > 3 {
		t.Fatalf("%d layer GETs at once, want at most 3: the seed and 2 agents with permits", p)
	}
}
