package agent_test

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testdisk"
	"github.com/starling-oci/starling/internal/testregistry"
)

// fillDisk writes a ballast file until the filesystem is full.
func fillDisk(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "ballast")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	for {
		if _, err := f.Write(chunk); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return path
			}
			t.Fatal(err)
		}
	}
}

// Invariant 7 at the mirror: with its data disk full the agent stays up,
// answers a blob it cannot store with 507 and an OCI body, keeps serving
// what it has and the manifests it is asked for, and pulls again as soon
// as space returns.
func TestAgentSurvivesAFullDisk(t *testing.T) {
	up := testregistry.New(t)
	up.Push(t, "app:v1", 2, 1<<20)
	other := up.Push(t, "other:v1", 2, 1<<20)
	dir := testdisk.Tmpfs(t, 128<<20)
	mirror := startAgent(t, func(c *agent.Config) { c.DataDir = dir; c.Prefetch = false }, up.URL())
	pull(t, mirror, "app:v1")
	ballast := fillDisk(t, dir)

	layers, _ := other.Layers()
	d, _ := layers[0].Digest()
	resp, err := http.Get(mirror.URL + "/v2/other/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	if code := ociCode(t, resp); resp.StatusCode != http.StatusInsufficientStorage || code != "UNAVAILABLE" {
		t.Fatalf("blob fetch on a full disk: %d %s, want 507 UNAVAILABLE", resp.StatusCode, code)
	}
	pull(t, mirror, "app:v1") // what is here is still served
	for range 50 {            // manifests keep coming through (their caching fails as an error)
		if got := fetch(t, http.MethodGet, mirror.URL+"/v2/other/manifests/v1", ""); got != http.StatusOK {
			t.Fatalf("manifest on a full disk: %d", got)
		}
	}

	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	pull(t, mirror, "other:v1")
}
