package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/starling-oci/starling/e2e/harness"
	"github.com/starling-oci/starling/pkg/rendezvous"
)

// TestPreheatFromRegistryNotifications: a real distribution registry
// (Debian's docker-registry) sends its push notifications, with a bearer
// token, to a real supernode. The supernode fetches the manifest and has
// every blob seeded by the supernode that owns it by rendezvous (the image
// is chosen so that both of two supernodes own some). Then an agent pulls
// the image and the registry serves no blob again: each blob crossed the
// upstream link once, before the pull, to a supernode. A Harbor-shaped
// envelope (Go-cased field names) and `starling preheat` with basic auth
// preheat a second image; a request without credentials gets 401.
func TestPreheatFromRegistryNotifications(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	bin := harness.BuildStarling(t)
	const token = "preheat-e2e-token"
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	basicFile := filepath.Join(dir, "basic")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(basicFile, []byte("harbor:hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// The registry needs the supernode's URL in its config and the
	// supernode the registry's: the registry posts to a forwarder in the
	// test (127.0.0.1:0) that relays the envelopes, unchanged, to the
	// supernode once it runs.
	var target atomic.Pointer[url.URL]
	fwd := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u := target.Load()
		if u == nil {
			http.Error(w, "supernode not up yet", http.StatusServiceUnavailable)
			return
		}
		httputil.NewSingleHostReverseProxy(u).ServeHTTP(w, r)
	}))
	t.Cleanup(fwd.Close)
	reg := harness.StartRegistry(t, harness.RegistryOptions{
		NotifyURL:     fwd.URL + "/registry/notifications",
		NotifyHeaders: map[string][]string{"Authorization": {"Bearer " + token}},
	})

	key := newSwarmKey(t, bin)
	snA := startSupernode(t, bin, reg, key)
	snB := startSupernode(t, bin, reg, key, "--supernode", snA.P2PAddrs()[0], "--http-listen", "127.0.0.1:0",
		"--preheat-token-file", tokenFile, "--preheat-basic-auth-file", basicFile)
	u, err := url.Parse(snB.HTTPURL())
	if err != nil {
		t.Fatal(err)
	}
	target.Store(u)
	owners := []string{peerID(t, snA), peerID(t, snB)}

	// Health, and no credentials, no preheat.
	if code, _ := get(t, snB.HTTPURL()+"/health"); code != http.StatusOK {
		t.Errorf("GET /health = %d", code)
	}
	resp, err := http.Post(snB.HTTPURL()+"/registry/notifications", "application/json", strings.NewReader(`{"events":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("notification without credentials: %s, want 401", resp.Status)
	}

	// 1. Pushed: the registry notifies, the supernodes seed.
	const repo = "e2e/preheat"
	img, blobs := splitImage(t, owners)
	pushImage(t, reg.Addr(), repo, "v1", img)
	waitSeeded(t, reg, repo, blobs)
	// B handed A its blobs over /starling/preheat/1.
	if v := sample(scrapeAndLint(t, snA.MetricsURL()), "starling_preheat_requests_total", map[string]string{"result": "forwarded"}); v < 1 {
		t.Errorf("supernode A preheat_requests_total{result=forwarded} = %v: B did not hand it the blobs it owns", v)
	}

	// The storm after the preheat: no upstream blob request.
	ag := startSwarmAgent(t, bin, reg, key, snA, "--supernode", snB.P2PAddrs()[0])
	if err := pullImageVia(t.Context(), ag.MirrorAddr(), repo, "v1", img); err != nil {
		t.Fatal(err)
	}
	assertBlobGETsOnlyFrom(t, waitSentinel(t, reg), repo, blobs, supernodeUserAgent)

	// 2. Harbor's Kraken driver: Go-cased field names, bearer token.
	const repo2 = "e2e/preheat-harbor"
	img2, blobs2 := splitImage(t, owners)
	pushImage(t, reg.Addr(), repo2, "v1", img2) // the registry notifies too; the seeds fetch each blob once anyway
	d2, err := img2.Digest()
	if err != nil {
		t.Fatal(err)
	}
	harbor := fmt.Sprintf(`{"Events":[{"ID":"1","TimeStamp":"2026-01-01T00:00:00Z","Action":"push","Target":{"MediaType":"application/vnd.docker.distribution.manifest.v2+json","Digest":%q,"Repository":%q,"URL":"http://%s/v2/%s/manifests/%s","Tag":"v1"}}]}`,
		d2, repo2, reg.Addr(), repo2, d2)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, snB.HTTPURL()+"/registry/notifications", bytes.NewReader([]byte(harbor)))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var accepted map[string]int
	_ = json.NewDecoder(resp.Body).Decode(&accepted)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || accepted["accepted"] != 1 {
		t.Errorf("Harbor-shaped envelope: %s %v, want 200 and one manifest accepted", resp.Status, accepted)
	}
	waitSeeded(t, reg, repo2, blobs2)

	// 3. `starling preheat` with basic auth (Harbor's other auth mode).
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "preheat", "--supernode-url", snB.HTTPURL(), "--basic-auth-file", basicFile,
		reg.Addr()+"/"+repo2+":v1").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "accepted") {
		t.Errorf("starling preheat: %v\n%s", err, out)
	}
	out, err = exec.CommandContext(ctx, bin, "preheat", "--supernode-url", snB.HTTPURL(), reg.Addr()+"/"+repo2+":v1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "401") {
		t.Errorf("starling preheat without credentials: %v\n%s; want a 401 error", err, out)
	}
	// Preheating again costs the registry nothing more: still once per blob.
	assertBlobGETsOnlyFrom(t, waitSentinel(t, reg), repo2, blobs2, supernodeUserAgent)
}

func peerID(t *testing.T, sn *harness.Supernode) string {
	t.Helper()
	a := sn.P2PAddrs()[0]
	i := strings.LastIndex(a, "/p2p/")
	if i < 0 {
		t.Fatalf("address %q has no /p2p/", a)
	}
	return a[i+len("/p2p/"):]
}

// splitImage makes random images until both supernodes own at least one
// of its blobs (config and layers), so preheat must route both ways.
func splitImage(t *testing.T, owners []string) (v1.Image, []v1.Hash) {
	t.Helper()
	for range 50 {
		img, err := harness.RandomImage(3, 256<<10)
		if err != nil {
			t.Fatal(err)
		}
		blobs := blobDigests(t, img)
		owned := map[string]bool{}
		for _, b := range blobs {
			owned[rendezvous.Rank(b.String(), owners)[0]] = true
		}
		if len(owned) == 2 {
			return img, blobs
		}
	}
	t.Fatal("no random image split its blobs over both supernodes")
	return nil, nil
}

func pushImage(t *testing.T, registryHost, repo, tag string, img v1.Image) {
	t.Helper()
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", registryHost, repo, tag), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context())); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// waitSeeded waits until the registry has served every blob of repo to a
// supernode.
func waitSeeded(t *testing.T, reg *harness.Registry, repo string, blobs []v1.Hash) {
	t.Helper()
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		var bySeed []harness.Request
		for _, q := range harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/") {
			if strings.HasPrefix(q.UserAgent, supernodeUserAgent) && q.Status == http.StatusOK {
				bySeed = append(bySeed, q)
			}
		}
		return len(harness.CountByDigest(bySeed)) == len(blobs)
	})
}
