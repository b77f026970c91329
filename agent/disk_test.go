package agent_test

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
)

// tmpfs mounts a tmpfs of size bytes (needs CAP_SYS_ADMIN; a failure under
// CI=true, a skip elsewhere), unmounted when the test ends.
func tmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0755", size)); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mount a %d-byte tmpfs (CI runs as root): %v", size, err)
		}
		t.Skipf("mount tmpfs: %v (needs root; CI=true makes this a failure)", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

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
	dir := tmpfs(t, 128<<20)
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
