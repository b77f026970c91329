package e2e

import (
	"bytes"
	"strings"
	"testing"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestContainerdAloneRegistryDown: containerd resolves a tag with a HEAD and
// fetches everything else by digest; no other client ever GETs the tag
// through the agent. With the registry stopped, a containerd that has never
// seen the image still pulls it by tag from the agent alone.
func TestContainerdAloneRegistryDown(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/outage"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 2, 256<<10)
	blobs := blobDigests(t, img)
	ag := harness.StartAgent(t, bin, "--registry", reg.URL(), "--log-level", "debug")
	hostsDir := t.TempDir()
	if err := harness.WriteHostsToml(hostsDir, reg.Addr(), ag.MirrorAddr()); err != nil {
		t.Fatal(err)
	}

	ctd := harness.StartContainerd(t)
	if err := ctd.Pull(t, ref.String(), hostsDir); err != nil {
		t.Fatal(err)
	}
	assertContainerdContent(t, ctd, img)
	reqs := reg.WaitAccessLog(t, accessLogWait, func(reqs []harness.Request) bool {
		return allBlobsServed(reqs, repo, blobs)
	})
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("containerd reached the registry directly: %+v", q)
		}
		if q.Method == "GET" && strings.HasSuffix(q.URLPath(), "/manifests/v1") {
			t.Errorf("the tag was fetched with a GET, so this is not containerd's HEAD-then-digest path: %+v", q)
		}
	}
	ctd.Stop()
	if t.Failed() {
		t.FailNow()
	}

	reg.Stop()
	fresh := harness.StartContainerd(t)
	if err := fresh.Pull(t, ref.String(), hostsDir); err != nil {
		t.Fatalf("pull with the registry down: %v", err)
	}
	assertContainerdContent(t, fresh, img)
	log, err := ag.Process().Log()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(log, []byte("upstream unavailable: serving tag from cache")) {
		t.Errorf("the agent never reported serving the tag from its cache while the registry was down")
	}
}
