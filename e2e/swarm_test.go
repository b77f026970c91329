package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-oci/starling/e2e/harness"
)

// Issue "swarm": real `starling supernode` and `starling agent` processes
// sharing a private libp2p swarm, in front of a real distribution registry,
// pulled through by real containerd and go-containerregistry clients.

const (
	// supernodeUserAgent is what the supernode's seed sends upstream
	// (supernode.New).
	supernodeUserAgent = "starling-supernode"
	// pullClientUserAgent prefixes the user agent of the go-containerregistry
	// pulls below, so that one reaching the registry directly would show.
	pullClientUserAgent = "starling-e2e-ggcr"
	// swarmPieceSize is the supernode's --piece-size: small enough that a
	// few-MiB layer has several pieces for agents to trade.
	swarmPieceSize = 1 << 20
	// metricsWait bounds the wait for an agent's counters to catch up with
	// the bytes its client has already read (the counter is bumped just
	// after a piece is written, which is when readers may get it).
	metricsWait = 15 * time.Second
)

// TestSwarmPullStorm is the acceptance test of the swarm: four agents behind
// one supernode, two pulled by containerd and two by go-containerregistry,
// all at once. Every blob crosses the upstream link once, fetched by the
// supernode; no client reaches the registry; every agent got its blobs over
// the swarm, and some pieces went from agent to agent.
func TestSwarmPullStorm(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/swarm"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 3, 4<<20)
	blobs := blobDigests(t, img)
	total := imageBlobBytes(t, img)

	key := newSwarmKey(t, bin)
	// The seed uploads at 8 MiB/s while the agents' own links are
	// unlimited: four agents wanting ~12 MiB each cannot all get everything
	// from the seed quickly, so they trade pieces.
	sn := startSupernode(t, bin, reg, key, "--upload-rate", "8MiB")
	var agents []*harness.Agent
	for range 4 {
		agents = append(agents, startSwarmAgent(t, bin, reg, key, sn))
	}
	// Two containerd instances, each with its own agent as mirror; the
	// other two agents are pulled by go-containerregistry.
	ctds := []*harness.Containerd{harness.StartContainerd(t), harness.StartContainerd(t)}
	var hostsDirs []string
	for i, ctd := range ctds {
		dir := filepath.Join(ctd.Dir(), "hosts")
		if err := harness.WriteHostsToml(dir, reg.Addr(), agents[i].MirrorAddr()); err != nil {
			t.Fatal(err)
		}
		hostsDirs = append(hostsDirs, dir)
	}

	// All four pulls start together. Plain goroutines, not parallel
	// subtests: those would be throttled to -parallel (GOMAXPROCS) at a
	// time and the pulls would run one after the other.
	type pull struct {
		name string
		run  func() error
	}
	var pulls []pull
	for i, ctd := range ctds {
		pulls = append(pulls, pull{"containerd via " + agents[i].Name(), func() error {
			return ctd.Pull(t, ref.String(), hostsDirs[i])
		}})
	}
	for _, ag := range agents[2:] {
		pulls = append(pulls, pull{"go-containerregistry via " + ag.Name(), func() error {
			return pullImageVia(t.Context(), ag.MirrorAddr(), repo, "v1", img)
		}})
	}
	errs := make([]error, len(pulls))
	took := make([]time.Duration, len(pulls))
	ready := make(chan struct{})
	var wg sync.WaitGroup
	for i, p := range pulls {
		wg.Go(func() {
			<-ready
			start := time.Now()
			errs[i] = p.run()
			took[i] = time.Since(start)
		})
	}
	start := time.Now()
	close(ready)
	wg.Wait()
	t.Logf("four concurrent pulls of %d blob bytes took %v", total, time.Since(start).Round(time.Millisecond))
	for i, p := range pulls {
		if errs[i] != nil {
			t.Errorf("%s: %v", p.name, errs[i])
		} else {
			t.Logf("%s: done in %v", p.name, took[i].Round(time.Millisecond))
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for _, ctd := range ctds {
		assertContainerdContent(t, ctd, img)
	}

	// Upstream: each blob exactly once, to the supernode.
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	reqs := waitSentinel(t, reg)
	assertBlobGETsOnlyFrom(t, reqs, repo, blobs, supernodeUserAgent)
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "containerd/") || strings.Contains(q.UserAgent, pullClientUserAgent) {
			t.Errorf("a client reached the registry directly: %+v", q)
		}
	}

	// Every agent got every blob byte over the swarm, none from upstream,
	// and at least some bytes came from another agent.
	var fromPeers int64
	for _, ag := range agents {
		m := waitMetrics(t, ag, func(m blobBytes) bool { return m.Peers+m.Seed+m.Upstream >= total })
		t.Logf("%s: %d bytes from peers, %d from the seed, %d from upstream (%d blob bytes)", ag.Name(), m.Peers, m.Seed, m.Upstream, total)
		if m.Upstream != 0 {
			t.Errorf("%s fetched %d bytes from upstream itself; want all from the swarm", ag.Name(), m.Upstream)
		}
		if m.Peers+m.Seed != total {
			t.Errorf("%s got %d bytes over the swarm (peers %d + seed %d), want exactly the image's %d blob bytes", ag.Name(), m.Peers+m.Seed, m.Peers, m.Seed, total)
		}
		fromPeers += m.Peers
	}
	if fromPeers == 0 {
		t.Errorf("no agent got a single byte from another agent: the swarm degenerated to client/server with the seed")
	}
}

// TestCrashMidPullAgentRestart kills an agent (SIGKILL) while it is pulling
// a 64 MiB layer over the swarm, restarts it on the same data dir, and pulls
// again: the client of the killed run sees a broken transfer, never a short
// or wrong blob passed off as complete, and after the restart the agent
// serves the blob with the right digest, resuming or discarding the
// partial.
func TestCrashMidPullAgentRestart(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo, tag = "e2e/crash", "v1"
	const size = 64 << 20
	img, layer := pushBigLayerImage(t, reg.Addr(), repo, tag, size)
	blobs := blobDigests(t, img)
	digest, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}

	key := newSwarmKey(t, bin)
	// 16 MiB/s: the 64 MiB layer takes about four seconds to cross the
	// swarm, a wide window to kill the agent in.
	sn := startSupernode(t, bin, reg, key, "--upload-rate", "16MiB")
	ag := startSwarmAgent(t, bin, reg, key, sn)
	partialPath := filepath.Join(ag.DataDir(), "partial", "sha256", digest.Hex)
	blobPath := filepath.Join(ag.DataDir(), "blobs", "sha256", digest.Hex)
	blobURL := fmt.Sprintf("%s/v2/%s/blobs/%s", ag.MirrorURL(), repo, digest)

	type result struct {
		n   int64
		sum string
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, sum, err := getAndHash(t.Context(), blobURL)
		done <- result{n, sum, err}
	}()

	// Kill once the partial file exists and some (but not all) pieces
	// have arrived.
	var before blobBytes
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case r := <-done:
			t.Fatalf("the pull ended before the agent could be killed (%d bytes, sha256:%s, err %v): make the layer bigger or the seed slower", r.n, r.sum, r.err)
		default:
		}
		_, statErr := os.Stat(partialPath)
		m, err := readMetrics(t.Context(), ag)
		if err == nil && statErr == nil && m.Peers+m.Seed >= 4*swarmPieceSize {
			before = m
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no partial blob at %s with pieces from the swarm after 60s (stat: %v; metrics %+v, %v)", partialPath, statErr, m, err)
		}
		time.Sleep(20 * time.Millisecond) // poll interval of a condition with a deadline
	}
	ag.Kill()
	t.Logf("killed %s with %d of %d bytes from the swarm", ag.Name(), before.Peers+before.Seed, size)

	select {
	case r := <-done:
		// The response has a Content-Length: a cut connection must show as
		// an error, not as a short body the client takes for the blob.
		if r.err == nil {
			t.Errorf("the killed agent's client read %d bytes (sha256:%s) and saw no error; want a broken transfer", r.n, r.sum)
		} else {
			t.Logf("the killed agent's client got %d bytes, then: %v", r.n, r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the client of the killed agent is still reading 30s after the kill")
	}
	// The kill really came mid-pull.
	if _, err := os.Stat(blobPath); err == nil {
		t.Fatalf("the blob was already complete at %s when the agent was killed: the test did not crash a pull", blobPath)
	}
	if _, err := os.Stat(partialPath); err != nil {
		t.Fatalf("after the kill: %v", err)
	}

	ag.Restart(t)
	// Whatever the killed run left on disk, the blob now served is the
	// right one: by plain GET (hashed here) and by a full image pull.
	n, sum, err := getAndHash(t.Context(), fmt.Sprintf("%s/v2/%s/blobs/%s", ag.MirrorURL(), repo, digest))
	if err != nil {
		t.Fatalf("GET of the blob after the restart: %v", err)
	}
	if n != size || sum != digest.Hex {
		t.Fatalf("after the restart the agent served %d bytes hashing to sha256:%s, want %d bytes of %s", n, sum, int64(size), digest)
	}
	if err := pullImageVia(t.Context(), ag.MirrorAddr(), repo, tag, img); err != nil {
		t.Fatal(err)
	}
	// Committed: the complete file on disk is the blob.
	var onDisk string
	err = pollUntil(t, accessLogWait, func() bool {
		onDisk, err = fileSHA256(blobPath)
		return err == nil
	})
	if err != nil {
		t.Fatalf("the blob was never committed to %s: %v", blobPath, err)
	}
	if onDisk != digest.Hex {
		t.Errorf("committed blob file hashes to sha256:%s, want %s", onDisk, digest)
	}

	// Resuming and discarding are both correct; say which happened. The
	// restarted agent also fetched the (small) config blob.
	want := imageBlobBytes(t, img)
	after := waitMetrics(t, ag, func(m blobBytes) bool { return m.Peers+m.Seed+m.Upstream > 0 })
	got := after.Peers + after.Seed + after.Upstream
	if got < want {
		t.Logf("resumed: the restarted agent fetched %d of the image's %d blob bytes (peers %d, seed %d, upstream %d)", got, want, after.Peers, after.Seed, after.Upstream)
	} else {
		t.Logf("partial discarded: the restarted agent fetched %d bytes for the image's %d blob bytes (peers %d, seed %d, upstream %d)", got, want, after.Peers, after.Seed, after.Upstream)
	}

	// The supernode was never disturbed: each blob crossed the upstream
	// link once, to it; the agent never had to go back to the source.
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	assertBlobGETsOnlyFrom(t, waitSentinel(t, reg), repo, blobs, supernodeUserAgent)
}

// TestSupernodeKilledAgentFallsBackToUpstream kills the supernode (SIGKILL)
// while its agent runs: the agent's next pull still succeeds, by fetching
// straight from the registry.
func TestSupernodeKilledAgentFallsBackToUpstream(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/supernode-down"
	before, _ := harness.PushRandomImage(t, reg.Addr(), repo, "before", 2, 512<<10)
	after, _ := harness.PushRandomImage(t, reg.Addr(), repo, "after", 2, 512<<10)
	beforeBlobs, afterBlobs := blobDigests(t, before), blobDigests(t, after)

	key := newSwarmKey(t, bin)
	sn := startSupernode(t, bin, reg, key)
	ag := startSwarmAgent(t, bin, reg, key, sn)

	// While the supernode lives, blobs come through the swarm (and the
	// agent holds a libp2p connection to the supernode).
	if err := pullImageVia(t.Context(), ag.MirrorAddr(), repo, "before", before); err != nil {
		t.Fatal(err)
	}
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, beforeBlobs)
	})
	assertBlobGETsOnlyFrom(t, waitSentinel(t, reg), repo, beforeBlobs, supernodeUserAgent)
	m0 := waitMetrics(t, ag, func(m blobBytes) bool { return m.Seed >= imageBlobBytes(t, before) })

	sn.Kill()
	start := time.Now()
	if err := pullImageVia(t.Context(), ag.MirrorAddr(), repo, "after", after); err != nil {
		t.Fatalf("pull with the supernode dead: %v", err)
	}
	t.Logf("pull with the supernode dead took %v", time.Since(start).Round(time.Millisecond))

	// Back to source: the agent itself fetched each new blob once.
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, afterBlobs)
	})
	reqs := waitSentinel(t, reg)
	gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/")
	counts := harness.CountByDigest(gets)
	for _, d := range afterBlobs {
		if counts[d.String()] != 1 {
			t.Errorf("blob %s GET from the registry %d times, want once", d, counts[d.String()])
		}
	}
	for _, q := range gets {
		want := agentUserAgent
		for _, d := range beforeBlobs {
			if q.Digest() == d.String() {
				want = supernodeUserAgent
			}
		}
		if !strings.HasPrefix(q.UserAgent, want) || q.Status != http.StatusOK {
			t.Errorf("%s %s answered %d to %q, want 200 to %s", q.Method, q.Path, q.Status, q.UserAgent, want)
		}
	}
	if t.Failed() {
		t.Logf("registry blob GETs:\n%s", harness.FormatRequests(gets))
	}
	want := imageBlobBytes(t, after)
	m := waitMetrics(t, ag, func(m blobBytes) bool { return m.Upstream >= want })
	if m.Upstream != want || m.Seed != m0.Seed || m.Peers != m0.Peers {
		t.Errorf("agent metrics after the supernode died: %+v, before: %+v; want exactly %d more bytes from upstream and no more from the swarm", m, m0, want)
	}
}

// TestSupernodeKilledMidPull kills the supernode (SIGKILL) while an agent
// is pulling a 32 MiB layer from it over the swarm: the pull still
// completes with the right digest, the agent fetching what it lacks from the
// registry.
func TestSupernodeKilledMidPull(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo, tag = "e2e/supernode-mid-pull", "v1"
	const size = 32 << 20
	_, layer := pushBigLayerImage(t, reg.Addr(), repo, tag, size)
	digest, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	key := newSwarmKey(t, bin)
	// 8 MiB/s: the layer takes four seconds to cross the swarm.
	sn := startSupernode(t, bin, reg, key, "--upload-rate", "8MiB")
	ag := startSwarmAgent(t, bin, reg, key, sn)

	type result struct {
		n   int64
		sum string
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		n, sum, err := getAndHash(t.Context(), fmt.Sprintf("%s/v2/%s/blobs/%s", ag.MirrorURL(), repo, digest))
		done <- result{n, sum, err}
	}()
	// Kill the supernode once the agent has some pieces from it.
	var m blobBytes
	var lastErr error
	err = pollUntil(t, 60*time.Second, func() bool {
		m, lastErr = readMetrics(t.Context(), ag)
		return lastErr == nil && m.Seed >= 2*swarmPieceSize
	})
	if err != nil {
		t.Fatalf("the agent got no pieces from the seed: %v (metrics %+v, %v)", err, m, lastErr)
	}
	sn.Kill()
	killedAt := time.Since(start)
	t.Logf("killed the supernode after %v, the agent having %d bytes from it", killedAt.Round(time.Millisecond), m.Seed)

	var r result
	select {
	case r = <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("the pull did not end within 60s of the supernode's death")
	}
	if r.err != nil || r.n != size || r.sum != digest.Hex {
		t.Fatalf("pull with the supernode killed mid-way: %d bytes hashing to sha256:%s, error %v; want %d bytes of %s", r.n, r.sum, r.err, int64(size), digest)
	}
	t.Logf("the pull completed %v after the supernode died", (time.Since(start) - killedAt).Round(time.Millisecond))

	// Back to source: the agent itself asked the registry for the layer.
	reqs := reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		for _, q := range harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/") {
			if q.Digest() == digest.String() && strings.HasPrefix(q.UserAgent, agentUserAgent) {
				return true
			}
		}
		return false
	})
	after := waitMetrics(t, ag, func(m blobBytes) bool { return m.Seed+m.Peers+m.Upstream >= size })
	t.Logf("agent: %d bytes from the seed, %d from upstream; registry blob GETs:\n%s", after.Seed, after.Upstream,
		harness.FormatRequests(harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/")))
	if after.Upstream == 0 {
		t.Errorf("agent metrics %+v: no bytes from upstream, yet the supernode died mid-pull", after)
	}
}

// --- helpers ---

// newSwarmKey runs `starling swarm-key` and writes its output to a file.
func newSwarmKey(t *testing.T, bin string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "swarm-key").Output()
	if err != nil {
		t.Fatalf("starling swarm-key: %v", err)
	}
	if !strings.HasPrefix(string(out), "/key/swarm/psk/1.0.0/\n") {
		t.Fatalf("starling swarm-key printed %q, want a libp2p pre-shared key file", out)
	}
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startSupernode starts `starling supernode` on loopback with 1 MiB pieces
// and an identity file, and checks that it listens under the peer ID that
// `starling id` gives for that file.
func startSupernode(t *testing.T, bin string, reg *harness.Registry, key string, extra ...string) *harness.Supernode {
	t.Helper()
	identity := filepath.Join(t.TempDir(), "identity.key")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "id", identity).Output()
	if err != nil {
		t.Fatalf("starling id: %v", err)
	}
	id := strings.TrimSpace(string(out))
	args := append([]string{
		"--p2p-listen", "/ip4/127.0.0.1/tcp/0",
		"--identity", identity,
		"--swarm-key", key,
		"--registry", reg.URL(),
		"--piece-size", strconv.Itoa(swarmPieceSize),
	}, extra...)
	sn := harness.StartSupernode(t, bin, args...)
	addrs := sn.P2PAddrs()
	if !strings.HasPrefix(addrs[0], "/ip4/127.0.0.1/tcp/") || !strings.HasSuffix(addrs[0], "/p2p/"+id) {
		t.Fatalf("supernode addresses %v: want /ip4/127.0.0.1/tcp/N/p2p/%s (the ID of its identity file)", addrs, id)
	}
	return sn
}

// startSwarmAgent starts `starling agent` on loopback, in the swarm of sn.
func startSwarmAgent(t *testing.T, bin string, reg *harness.Registry, key string, sn *harness.Supernode, extra ...string) *harness.Agent {
	t.Helper()
	args := append([]string{
		"--registry", reg.URL(),
		"--supernode", sn.P2PAddrs()[0],
		"--p2p-listen", "/ip4/127.0.0.1/tcp/0",
		"--swarm-key", key,
	}, extra...)
	ag := harness.StartAgent(t, bin, args...)
	if p := ag.P2PAddrs(); len(p) == 0 || !strings.HasPrefix(p[0], "/ip4/127.0.0.1/tcp/") {
		t.Fatalf("%s p2p addresses %v: want a loopback TCP address", ag.Name(), p)
	}
	return ag
}

// pushBigLayerImage pushes a one-layer image whose layer is size
// pseudo-random bytes (not a tarball: only go-containerregistry and plain
// HTTP clients pull it, and neither unpacks).
func pushBigLayerImage(t *testing.T, registryHost, repo, tag string, size int) (v1.Image, v1.Layer) {
	t.Helper()
	data := make([]byte, size)
	var seed [32]byte
	copy(seed[:], t.Name())
	_, _ = rand.NewChaCha8(seed).Read(data) // never fails
	layer := static.NewLayer(data, types.DockerLayer)
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", registryHost, repo, tag), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context())); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return img, layer
}

// pullImageVia pulls repo:tag with go-containerregistry from the agent's
// mirror address (its default upstream: no ns=) and checks the manifest
// digest and every blob against want, hashing the bytes here as well as in
// go-containerregistry's verifying readers. Layers are read concurrently,
// as container runtimes do.
func pullImageVia(ctx context.Context, mirror, repo, tag string, want v1.Image) error {
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", mirror, repo, tag), name.Insecure)
	if err != nil {
		return err
	}
	img, err := remote.Image(ref, remote.WithContext(ctx), remote.WithUserAgent(pullClientUserAgent))
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	gotD, err := img.Digest()
	if err != nil {
		return err
	}
	wantD, err := want.Digest()
	if err != nil {
		return err
	}
	if gotD != wantD {
		return fmt.Errorf("pull %s: manifest digest %s, want %s", ref, gotD, wantD)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("pull %s: config: %w", ref, err)
	}
	wantCfg, err := want.ConfigName()
	if err != nil {
		return err
	}
	if sum := sha256.Sum256(rawCfg); hex.EncodeToString(sum[:]) != wantCfg.Hex {
		return fmt.Errorf("pull %s: config hashes to sha256:%x, want %s", ref, sum, wantCfg)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	errs := make([]error, len(layers))
	var wg sync.WaitGroup
	for i, l := range layers {
		wg.Go(func() { errs[i] = checkLayer(l) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func checkLayer(l v1.Layer) error {
	d, err := l.Digest()
	if err != nil {
		return err
	}
	size, err := l.Size()
	if err != nil {
		return err
	}
	rc, err := l.Compressed()
	if err != nil {
		return fmt.Errorf("layer %s: %w", d, err)
	}
	defer rc.Close()
	h := sha256.New()
	n, err := io.Copy(h, rc)
	if err != nil {
		return fmt.Errorf("layer %s: read after %d bytes: %w", d, n, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); n != size || got != d.Hex {
		return fmt.Errorf("layer %s: got %d bytes hashing to sha256:%s, want %d bytes", d, n, got, size)
	}
	return nil
}

// getAndHash GETs u and returns how many body bytes it read and their
// sha256 (hex). A body cut short of its Content-Length is an error.
func getAndHash(ctx context.Context, u string) (int64, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("User-Agent", pullClientUserAgent)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	h := sha256.New()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return 0, "", fmt.Errorf("GET %s: %s: %s", u, resp.Status, b)
	}
	n, err := io.Copy(h, resp.Body)
	return n, hex.EncodeToString(h.Sum(nil)), err
}

// imageBlobBytes is the sum of the sizes of the image's config and layers.
func imageBlobBytes(t *testing.T, img v1.Image) int64 {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	total := m.Config.Size
	for _, l := range m.Layers {
		total += l.Size
	}
	return total
}

// assertBlobGETsOnlyFrom checks that the registry served each blob of repo
// exactly once, in full, to userAgent, and no other blob GET of repo.
func assertBlobGETsOnlyFrom(t *testing.T, reqs []harness.Request, repo string, blobs []v1.Hash, userAgent string) {
	t.Helper()
	gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/")
	counts := harness.CountByDigest(gets)
	var problems []string
	for _, d := range blobs {
		if n := counts[d.String()]; n != 1 {
			problems = append(problems, fmt.Sprintf("blob %s served %d times, want once", d, n))
		}
	}
	if len(gets) != len(blobs) {
		problems = append(problems, fmt.Sprintf("%d blob GETs, want %d (one per blob)", len(gets), len(blobs)))
	}
	for _, q := range gets {
		if !strings.HasPrefix(q.UserAgent, userAgent) || q.Status != http.StatusOK {
			problems = append(problems, fmt.Sprintf("%s %s answered %d to %q, want 200 to %s", q.Method, q.Path, q.Status, q.UserAgent, userAgent))
		}
	}
	if len(problems) > 0 {
		t.Errorf("registry blob GETs of %s:\n  %s\nall blob GETs:\n%s", repo, strings.Join(problems, "\n  "), harness.FormatRequests(gets))
	}
}

// blobBytes are an agent's starling_blob_bytes_total counters.
type blobBytes struct {
	Upstream, Peers, Seed int64
}

// readMetrics GETs the agent's /metrics and parses
// starling_blob_bytes_total{source="upstream"|"peers"|"seed"}; all three
// must be present.
func readMetrics(ctx context.Context, ag *harness.Agent) (blobBytes, error) {
	var m blobBytes
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, ag.MirrorURL()+"/metrics", nil)
	if err != nil {
		return m, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return m, fmt.Errorf("metrics of %s: %w", ag.Name(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return m, fmt.Errorf("metrics of %s: %s", ag.Name(), resp.Status)
	}
	fields := map[string]*int64{
		`starling_blob_bytes_total{source="upstream"}`: &m.Upstream,
		`starling_blob_bytes_total{source="peers"}`:    &m.Peers,
		`starling_blob_bytes_total{source="seed"}`:     &m.Seed,
	}
	seen := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		series, val, ok := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		p, known := fields[series]
		if !ok || !known {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			return m, fmt.Errorf("metrics of %s: %q: %w", ag.Name(), sc.Text(), err)
		}
		*p, seen[series] = int64(v), true
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("metrics of %s: %w", ag.Name(), err)
	}
	for s := range fields {
		if !seen[s] {
			return m, fmt.Errorf("metrics of %s: no %s", ag.Name(), s)
		}
	}
	return m, nil
}

// waitMetrics polls the agent's metrics until cond holds and returns them.
func waitMetrics(t *testing.T, ag *harness.Agent, cond func(blobBytes) bool) blobBytes {
	t.Helper()
	var m blobBytes
	var lastErr error
	err := pollUntil(t, metricsWait, func() bool {
		m, lastErr = readMetrics(t.Context(), ag)
		return lastErr == nil && cond(m)
	})
	if err != nil {
		t.Fatalf("%s metrics: %v; last read %+v (error %v)", ag.Name(), err, m, lastErr)
	}
	return m
}

// pollUntil calls cond every 20ms until it returns true, and fails after
// timeout.
func pollUntil(t *testing.T, timeout time.Duration, cond func() bool) error {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("condition not met after %v", timeout)
		}
		select {
		case <-t.Context().Done():
			return t.Context().Err()
		case <-time.After(20 * time.Millisecond): // poll interval of a condition with a deadline
		}
	}
	return nil
}
