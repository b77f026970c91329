package agent_test

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
)

// A complete blob whose file rots on disk is never served whole to the
// agent's own client: the response is cut short (the client sees a
// failure, not a 200 with the wrong bytes), the blob is quarantined, and
// the next request fetches it again from upstream.
func TestCorruptCompleteBlobIsNeverServed(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 1<<20)
	dir := t.TempDir()
	mirror := startAgent(t, func(c *agent.Config) { c.DataDir = dir; c.Prefetch = false }, up.URL())
	pull(t, mirror, "app:v1")
	layers, _ := img.Layers()
	d, _ := layers[0].Digest()

	path := filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(d.String(), "sha256:"))
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("rot"), 1000); err != nil {
		t.Fatal(err)
	}
	f.Close()

	get := func() (int, string, error) {
		resp, err := http.Get(mirror.URL + "/v2/app/blobs/" + d.String())
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		h := sha256.New()
		_, err = io.Copy(h, resp.Body)
		return resp.StatusCode, "sha256:" + hex.EncodeToString(h.Sum(nil)), err
	}
	status, got, err := get()
	if err == nil && status == http.StatusOK && got != d.String() {
		t.Fatalf("a corrupt cached blob was served whole: 200, content hashes to %s, want %s", got, d)
	}
	before := up.BlobGETs()[d.String()]
	status, got, err = get()
	if err != nil || status != http.StatusOK || got != d.String() {
		t.Fatalf("after the corruption was found: %d %s %v, want the right blob", status, got, err)
	}
	if up.BlobGETs()[d.String()] != before+1 {
		t.Fatalf("the quarantined blob was not fetched again from upstream")
	}
}
