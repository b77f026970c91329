package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-oci/starling/e2e/harness"
)

// Issue "agent as a registry mirror": one real `starling agent` in front of
// a real distribution registry, pulled through by real containerd and
// skopeo.

const (
	mirrorLayers    = 4
	mirrorLayerSize = 1 << 20

	// agentUserAgent is what the agent sends upstream (agent.New).
	agentUserAgent = "starling-agent"
	// accessLogWait bounds waits for the registry's access log, which is
	// written just after a response completes.
	accessLogWait = 15 * time.Second
)

// TestAgentMirror pulls one image through one agent with containerd
// (?ns=<registry>) and then skopeo (no ns, the agent's default upstream),
// checks that the registry served each blob once and only to the agent,
// then stops the registry and pulls again from the agent's cache alone.
func TestAgentMirror(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr", "skopeo")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/mirror"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", mirrorLayers, mirrorLayerSize)
	blobs := blobDigests(t, img)
	ag := harness.StartAgent(t, bin, "--registry", reg.URL(), "--log-level", "debug")

	hostsDir := t.TempDir()
	if err := harness.WriteHostsToml(hostsDir, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}
	regConf := filepath.Join(t.TempDir(), "registries.conf")
	if err := harness.WriteRegistriesConf(regConf, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}

	// 1. containerd, through the agent as mirror of the registry host.
	ctd := harness.StartContainerd(t)
	if err := ctd.Pull(t, ref.String(), hostsDir); err != nil {
		t.Fatal(err)
	}
	assertContainerdContent(t, ctd, img)

	reqs := reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	assertBlobGETsOnlyFrom(t, reqs, repo, blobs, agentUserAgent)
	// containerd falls back to the registry when the mirror fails; it must
	// not have needed to, for anything (manifests included).
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("containerd reached the registry directly: %+v", q)
		}
	}
	// The agent's own log: it served every blob to containerd, which named
	// the registry with ns=.
	waitAgentServed(t, ag, repo, blobs, reg.Addr())

	// 2. skopeo (the CRI-O / podman library), through the same agent as a
	// registries.conf mirror: no ns=, the agent's default upstream.
	dst := t.TempDir()
	if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "dir:"+dst, regConf); err != nil {
		t.Fatal(err)
	}
	assertDirBlobs(t, dst, blobs)
	// skopeo sends no ns=: the agent served it from its default upstream.
	waitAgentServed(t, ag, repo, blobs, "")
	// Anything skopeo's pull made the agent fetch upstream completed before
	// skopeo got its last byte; a request sent to the registry after skopeo
	// exited is logged after those.
	reqs = waitSentinel(t, reg)
	assertBlobGETsOnlyFrom(t, reqs, repo, blobs, agentUserAgent)
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "skopeo/") || strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("a client reached the registry directly: %+v", q)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// 3. The registry is gone: the image still pulls from the agent's
	// cache, into a containerd that has never seen it and with skopeo.
	reg.Stop()
	t.Run("registry-down", func(t *testing.T) {
		t.Run("containerd", func(t *testing.T) {
			t.Parallel()
			fresh := harness.StartContainerd(t)
			if have, err := fresh.ContentDigests(t); err != nil || len(have) != 0 {
				t.Fatalf("new containerd content store is not empty: %v, %v", have, err)
			}
			if err := fresh.Pull(t, ref.String(), hostsDir); err != nil {
				t.Fatal(err)
			}
			assertContainerdContent(t, fresh, img)
		})
		t.Run("skopeo", func(t *testing.T) {
			t.Parallel()
			dst := t.TempDir()
			if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "dir:"+dst, regConf); err != nil {
				t.Fatal(err)
			}
			assertDirBlobs(t, dst, blobs)
		})
	})
	// The pulls above really found the registry down and answered the tag
	// from the cache.
	log, err := ag.Process().Log()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(log, []byte("upstream unavailable: serving tag from cache")) {
		t.Errorf("the agent never reported serving a tag from cache while the registry was down")
	}
}

// TestAgentMirrorConcurrentColdPulls starts containerd and skopeo pulling
// the same image at once through a cold agent: whatever the interleaving,
// each blob crosses the upstream link once.
func TestAgentMirrorConcurrentColdPulls(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr", "skopeo")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/mirror-concurrent"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", mirrorLayers, mirrorLayerSize)
	blobs := blobDigests(t, img)
	ag := harness.StartAgent(t, bin, "--registry", reg.URL())
	ctd := harness.StartContainerd(t)

	hostsDir := t.TempDir()
	if err := harness.WriteHostsToml(hostsDir, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}
	regConf := filepath.Join(t.TempDir(), "registries.conf")
	if err := harness.WriteRegistriesConf(regConf, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()

	t.Run("pulls", func(t *testing.T) {
		t.Run("containerd", func(t *testing.T) {
			t.Parallel()
			if err := ctd.Pull(t, ref.String(), hostsDir); err != nil {
				t.Fatal(err)
			}
		})
		t.Run("skopeo", func(t *testing.T) {
			t.Parallel()
			if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "dir:"+dst, regConf); err != nil {
				t.Fatal(err)
			}
		})
	})
	if t.Failed() {
		t.FailNow()
	}
	assertContainerdContent(t, ctd, img)
	assertDirBlobs(t, dst, blobs)
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	reqs := waitSentinel(t, reg)
	assertBlobGETsOnlyFrom(t, reqs, repo, blobs, agentUserAgent)
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "skopeo/") || strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("a client reached the registry directly: %+v", q)
		}
	}
}

// --- helpers ---

func blobDigests(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	ds, err := harness.BlobDigests(img)
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

// allBlobsServed reports whether the log has a successful GET of every
// blob of repo.
func allBlobsServed(reqs []harness.Request, repo string, blobs []v1.Hash) bool {
	gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/")
	for _, d := range blobs {
		if !slices.ContainsFunc(gets, func(q harness.Request) bool {
			return q.Digest() == d.String() && q.Status == http.StatusOK
		}) {
			return false
		}
	}
	return true
}

// waitSentinel sends a GET /v2/ with a unique user agent to the registry
// and returns the access log once that request is in it.
func waitSentinel(t *testing.T, reg *harness.Registry) []harness.Request {
	t.Helper()
	ua := fmt.Sprintf("starling-e2e-sentinel/%d", time.Now().UnixNano())
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, reg.URL()+"/v2/", nil)
	if err != nil {
		t.Fatalf("build sentinel request: %v", err)
	}
	req.Header.Set("User-Agent", ua)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("sentinel request to the registry: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return slices.ContainsFunc(reqs, func(q harness.Request) bool { return q.UserAgent == ua })
	})
}

// assertContainerdContent checks that containerd's content store holds the
// manifest and every blob of img; containerd verifies each digest when it
// commits content.
func assertContainerdContent(t *testing.T, ctd *harness.Containerd, img v1.Image) {
	t.Helper()
	have, err := ctd.ContentDigests(t)
	if err != nil {
		t.Fatal(err)
	}
	md, err := img.Digest()
	if err != nil {
		t.Fatalf("digest of image: %v", err)
	}
	for _, d := range append(blobDigests(t, img), md) {
		if !slices.Contains(have, d.String()) {
			t.Errorf("containerd content store lacks %s; it has %v", d, have)
		}
	}
}

// assertDirBlobs checks a skopeo dir: copy: one file per blob, named by its
// digest's hex, whose bytes hash to that digest.
func assertDirBlobs(t *testing.T, dir string, blobs []v1.Hash) {
	t.Helper()
	for _, d := range blobs {
		got, err := fileSHA256(filepath.Join(dir, d.Hex))
		if err != nil {
			t.Errorf("skopeo copy: blob %s: %v", d, err)
			continue
		}
		if got != d.Hex {
			t.Errorf("skopeo copy: blob %s hashes to sha256:%s", d, got)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err != nil {
		t.Errorf("skopeo copy lacks its manifest: %v", err)
	}
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash file: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// agentRequest is one request as the agent's proxy logs it at debug level.
type agentRequest struct {
	Msg    string `json:"msg"`
	Method string `json:"method"`
	Path   string `json:"path"`
	NS     string `json:"ns"`
	Status int    `json:"status"`
	Bytes  int64  `json:"bytes"`
}

// Digest returns the digest of a blob request path.
func (r agentRequest) Digest() string {
	i := strings.LastIndex(r.Path, "/")
	return r.Path[i+1:]
}

func (r agentRequest) String() string {
	return fmt.Sprintf("%s %s ns=%q -> %d (%d bytes)", r.Method, r.Path, r.NS, r.Status, r.Bytes)
}

// waitAgentServed waits until the agent's log shows a complete, successful
// GET of every blob with the given ns query (empty: none). The agent logs a
// request just after its last byte is sent, so the line may trail the
// client by a moment.
func waitAgentServed(t *testing.T, ag *harness.Agent, repo string, blobs []v1.Hash, ns string) {
	t.Helper()
	deadline := time.Now().Add(accessLogWait)
	for {
		served, err := agentBlobGETs(ag, repo)
		if err != nil {
			t.Fatal(err)
		}
		var missing []string
		for _, d := range blobs {
			if !slices.ContainsFunc(served, func(r agentRequest) bool {
				return r.Digest() == d.String() && r.NS == ns && r.Status == http.StatusOK
			}) {
				missing = append(missing, d.String())
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the agent's log shows no successful GET with ns=%q of %v; it served:\n%v", accessLogWait, ns, missing, served)
		}
		select {
		case <-t.Context().Done():
			t.Fatalf("waiting for the agent's log: %v", t.Context().Err())
		case <-time.After(20 * time.Millisecond): // poll interval of a condition with a deadline
		}
	}
}

// agentBlobGETs parses the agent's log for the blob GETs of repo it has
// answered (needs --log-level debug).
func agentBlobGETs(ag *harness.Agent, repo string) ([]agentRequest, error) {
	log, err := ag.Process().Log()
	if err != nil {
		return nil, err
	}
	var out []agentRequest
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasPrefix(line, []byte("{")) {
			continue
		}
		var r agentRequest
		if err := json.Unmarshal(line, &r); err != nil {
			continue // a line still being written
		}
		if r.Msg == "request" && r.Method == http.MethodGet && strings.HasPrefix(r.Path, "/v2/"+repo+"/blobs/") {
			out = append(out, r)
		}
	}
	if err := sc.Err(); err != nil {
		return out, fmt.Errorf("scan agent log: %w", err)
	}
	return out, nil
}
