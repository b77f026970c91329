package access_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/access"
	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/upstream"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// A grant is per (registry, repository, digest, credentials), lasts the
// TTL, and outlives it only while upstream cannot be asked.
func TestGrantIsPerDigestAndRepositoryAndExpires(t *testing.T) {
	up := testregistry.New(t)
	pub := up.Push(t, "public/base:v1", 1, 1024)
	other := up.Push(t, "public/other:v1", 1, 1024)
	up.ScopeToRepos()
	regs, client, err := upstream.Open([]string{up.URL()}, upstream.Options{}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	reg, _ := regs.Lookup("")
	clk := &clock{t: time.Unix(1000, 0)}
	acc := access.New(client, time.Minute, clk.now)
	ctx := context.Background()
	cfgPub, _ := pub.ConfigName()
	cfgOther, _ := other.ConfigName()

	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgPub.String(), ""); err != nil {
		t.Fatalf("first check: %v", err)
	}
	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgPub.String(), ""); err != nil || up.Count("HEAD blobs") != 1 {
		t.Fatalf("second check within the TTL: %v, %d HEADs, want 1", err, up.Count("HEAD blobs"))
	}
	// Another digest in the same repository is asked for, and refused as
	// upstream refuses it.
	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgOther.String(), ""); !ocierr.IsStatus(err, http.StatusNotFound) {
		t.Fatalf("digest of another repository: %v, want upstream's 404", err)
	}
	// Other credentials are asked for too.
	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgPub.String(), "Bearer x"); err != nil || up.Count("HEAD blobs") != 3 {
		t.Fatalf("other credentials: %v, %d HEADs, want 3", err, up.Count("HEAD blobs"))
	}
	clk.t = clk.t.Add(2 * time.Minute)
	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgPub.String(), ""); err != nil || up.Count("HEAD blobs") != 4 {
		t.Fatalf("after the TTL: %v, %d HEADs, want 4", err, up.Count("HEAD blobs"))
	}
	clk.t = clk.t.Add(2 * time.Minute)
	up.Server.Close()
	if err := acc.Check(ctx, reg, "public/base", access.Blob, cfgPub.String(), ""); err != nil {
		t.Fatalf("upstream down, granted before: %v", err)
	}
	if err := acc.Check(ctx, reg, "public/other", access.Blob, cfgOther.String(), ""); !ocierr.IsStatus(err, http.StatusBadGateway) {
		t.Fatalf("upstream down, never granted: %v, want 502", err)
	}
}

// A manifest upstream gave grants the blobs it names, in that repository
// and for those credentials only.
func TestManifestGrantsItsBlobs(t *testing.T) {
	acc := access.New(nil, time.Minute, nil)
	body := []byte(`{"config":{"digest":"sha256:` + hex64('a') + `"},"layers":[{"digest":"sha256:` + hex64('b') + `"}]}`)
	acc.AllowManifest("r", "app", "sha256:"+hex64('c'), "", body)
	for _, d := range []byte{'a', 'b', 'c'} {
		if !acc.Allowed("r", "app", "sha256:"+hex64(d), "") {
			t.Errorf("sha256:%c... not granted", d)
		}
		if acc.Allowed("r", "other", "sha256:"+hex64(d), "") || acc.Allowed("r", "app", "sha256:"+hex64(d), "Bearer x") {
			t.Errorf("sha256:%c... granted beyond the repository or the credentials", d)
		}
	}
}

func hex64(c byte) string {
	b := make([]byte, 64)
	for i := range b {
		b[i] = c
	}
	return string(b)
}
