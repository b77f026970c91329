package e2e

import (
	"bytes"
	"encoding/base64"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/starling-oci/starling/e2e/harness"
)

// Issue "one manifest request per image per cluster": real containerd
// pulls through two real agents; tags and manifests go through the
// supernode, which asks the registry once for the cluster.

// manifestRequests returns the registry's manifest requests for repo.
func manifestRequests(reqs []harness.Request, repo string) []harness.Request {
	return harness.FilterRequests(reqs, "", "/v2/"+repo+"/manifests/")
}

// TestContainerdManifestsThroughSupernode: two containerd instances pull
// one tag at once, each through its own agent. The registry sees one
// manifest GET for the image and a HEAD per resolution of the tag, all
// from the supernode, and no manifest request from an agent or containerd.
// Then the registry goes down: the next pull still resolves the tag, as the
// supernode last resolved it (and the agent logs that it served it stale).
func TestContainerdManifestsThroughSupernode(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	// A repository named ".../manifests" also pins the mirror's routing of
	// its blob paths (/v2/e2e/manifests/blobs/...).
	const repo = "e2e/manifests"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 2, 256<<10)
	blobs := blobDigests(t, img)
	pushed := len(waitSentinel(t, reg)) // the push's requests are not the pull's

	key := newSwarmKey(t, bin)
	// --tag-ttl 0: every resolution goes to the registry (concurrent ones
	// shared), so the outage below needs no wait for a TTL to pass.
	sn := startSupernode(t, bin, reg, key, "--tag-ttl", "0")
	agents := []*harness.Agent{startSwarmAgent(t, bin, reg, key, sn), startSwarmAgent(t, bin, reg, key, sn)}
	ctds := []*harness.Containerd{harness.StartContainerd(t), harness.StartContainerd(t)}
	var hostsDirs []string
	for i, ctd := range ctds {
		dir := filepath.Join(ctd.Dir(), "hosts")
		if err := harness.WriteHostsToml(dir, reg.Addr(), agents[i].MirrorAddr()); err != nil {
			t.Fatal(err)
		}
		hostsDirs = append(hostsDirs, dir)
	}

	var wg sync.WaitGroup
	errs := make([]error, len(ctds))
	for i, ctd := range ctds {
		wg.Go(func() { errs[i] = ctd.Pull(t, ref.String(), hostsDirs[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("containerd via %s: %v", agents[i].Name(), err)
		}
	}
	for _, ctd := range ctds {
		assertContainerdContent(t, ctd, img)
	}
	for _, q := range waitSentinel(t, reg)[pushed:] {
		if strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("containerd reached the registry itself: %+v", q)
		}
	}
	reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	reqs := manifestRequests(waitSentinel(t, reg)[pushed:], repo)
	var gets, heads int
	for _, q := range reqs {
		if !strings.HasPrefix(q.UserAgent, supernodeUserAgent) {
			t.Errorf("manifest request from someone other than the supernode: %+v", q)
		}
		switch q.Method {
		case http.MethodGet:
			gets++
		case http.MethodHead:
			heads++
		}
	}
	// containerd resolves the tag with a HEAD, once per pull: at most two
	// resolutions, shared when they overlap.
	if gets != 1 || heads < 1 || heads > 2 {
		t.Errorf("registry saw %d manifest GETs and %d HEADs for two pulls; want 1 GET and 1 or 2 HEADs:\n%s",
			gets, heads, harness.FormatRequests(reqs))
	}

	// Registry down: the tag the cluster resolved is still served.
	reg.Stop()
	if err := ctds[0].Pull(t, ref.String(), hostsDirs[0]); err != nil {
		t.Fatalf("pull with the registry down: %v", err)
	}
	log, err := agents[0].Process().Log()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(log, []byte("serving tag as the cluster last resolved it")) {
		t.Errorf("%s did not log that it served the tag stale from the supernode", agents[0].Name())
	}
}

// TestContainerdManifestFallbackWithSupernodeDown: with the supernode
// killed, containerd still pulls a new tag through its agent, which asks
// the registry itself.
func TestContainerdManifestFallbackWithSupernodeDown(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/manifests-fallback"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 1, 128<<10)
	key := newSwarmKey(t, bin)
	sn := startSupernode(t, bin, reg, key)
	ag := startSwarmAgent(t, bin, reg, key, sn)
	ctd := harness.StartContainerd(t)
	dir := filepath.Join(ctd.Dir(), "hosts")
	if err := harness.WriteHostsToml(dir, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}
	sn.Kill()
	if err := ctd.Pull(t, ref.String(), dir); err != nil {
		t.Fatalf("pull with the supernode dead: %v", err)
	}
	assertContainerdContent(t, ctd, img)
	reqs := manifestRequests(waitSentinel(t, reg), repo)
	var fromAgent int
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("containerd reached the registry itself: %+v", q)
		}
		if strings.HasPrefix(q.UserAgent, agentUserAgent) && q.Status == http.StatusOK {
			fromAgent++
		}
	}
	if fromAgent == 0 {
		t.Errorf("no manifest request from the agent: the fallback did not run:\n%s", harness.FormatRequests(reqs))
	}
}

// TestContainerdPrivateManifestNeedsCredentials: a registry with htpasswd
// auth. containerd with the right credentials pulls through its agent (the
// supernode checks them upstream); another containerd without credentials,
// through another agent of the same swarm, gets nothing, though the
// supernode and the first agent hold the manifest; raw requests with no or
// wrong credentials are refused by both agents too.
func TestContainerdPrivateManifestNeedsCredentials(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{Users: map[string]string{"alice": "s3cret"}})
	const repo = "e2e/private-manifests"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 1, 128<<10,
		remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	key := newSwarmKey(t, bin)
	sn := startSupernode(t, bin, reg, key)
	agents := []*harness.Agent{startSwarmAgent(t, bin, reg, key, sn), startSwarmAgent(t, bin, reg, key, sn)}
	ctds := []*harness.Containerd{harness.StartContainerd(t), harness.StartContainerd(t)}
	var hostsDirs []string
	for i, ctd := range ctds {
		dir := filepath.Join(ctd.Dir(), "hosts")
		if err := harness.WriteHostsToml(dir, reg.Addr(), agents[i].MirrorAddr()); err != nil {
			t.Fatal(err)
		}
		hostsDirs = append(hostsDirs, dir)
	}
	if err := ctds[0].Pull(t, ref.String(), hostsDirs[0], "--user", "alice:s3cret"); err != nil {
		t.Fatalf("containerd with credentials: %v", err)
	}
	assertContainerdContent(t, ctds[0], img)
	if err := ctds[1].Pull(t, ref.String(), hostsDirs[1]); err == nil {
		t.Fatal("containerd without credentials pulled a private image")
	}
	// containerd falls back to the registry itself on any mirror failure:
	// the pull with credentials must not have needed that.
	for _, q := range waitSentinel(t, reg) {
		if strings.HasPrefix(q.UserAgent, "containerd/") && q.Status == http.StatusOK {
			t.Errorf("containerd got content from the registry itself: %+v", q)
		}
	}
	digest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	wrong := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:wrong"))
	for _, ag := range agents {
		for _, r := range []string{"v1", digest.String()} {
			for _, authz := range []string{"", wrong} {
				req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, ag.MirrorURL()+"/v2/"+repo+"/manifests/"+r+"?ns="+reg.Addr(), nil)
				if err != nil {
					t.Fatal(err)
				}
				if authz != "" {
					req.Header.Set("Authorization", authz)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusUnauthorized {
					t.Errorf("%s: %s with Authorization %q: %d, want 401", ag.Name(), r, authz, resp.StatusCode)
				}
			}
		}
	}
}
