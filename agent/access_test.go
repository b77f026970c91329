package agent_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-oci/starling/internal/testregistry"
)

// gatePrivate (installed after the pushes) makes up answer private/* only to "Bearer good", as a
// registry with a private project does; public/* stays anonymous.
func gatePrivate(up *testregistry.Registry) {
	up.ScopeToRepos()
	up.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/v2/private/") || r.Header.Get("Authorization") == "Bearer good" {
			return false
		}
		w.Header().Set("WWW-Authenticate", testregistry.Challenge)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
		return true
	})
}

// fetch GETs (or HEADs) a mirror path with the given Authorization and
// returns the status, having read the body.
func fetch(t *testing.T, method, url, authz string) int {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// imageDigests returns an image's manifest digest and its first layer's.
func imageDigests(t *testing.T, img v1.Image) (manifest, layer string) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	return must(img.Digest()).String(), must(layers[0].Digest()).String()
}

// cachePrivate has an authorised client pull private/app:v1's manifest
// and first layer through the mirror, so both are in its cache.
func cachePrivate(t *testing.T, mirror *httptest.Server, img v1.Image, ns string) {
	t.Helper()
	md, ld := imageDigests(t, img)
	for _, path := range []string{"/v2/private/app/manifests/v1", "/v2/private/app/manifests/" + md, "/v2/private/app/blobs/" + ld} {
		if got := fetch(t, http.MethodGet, mirror.URL+path+ns, "Bearer good"); got != http.StatusOK {
			t.Fatalf("authorised GET %s: %d", path, got)
		}
	}
}

// Invariant 6: a client allowed to read public/base must not read a
// private blob or manifest by naming its digest under public/base, nor
// under private/app without the credentials private/app needs.
func TestCachedContentIsNotServedAcrossRepositories(t *testing.T) {
	up := testregistry.New(t)
	priv := up.Push(t, "private/app:v1", 1, 4096)
	up.Push(t, "public/base:v1", 1, 4096)
	gatePrivate(up)
	mirror := startAgent(t, nil, up.URL())
	cachePrivate(t, mirror, priv, "")
	pull(t, mirror, "public/base:v1") // the anonymous client may read public/base

	md, ld := imageDigests(t, priv)
	for _, c := range []struct {
		path, authz string
		want        int
	}{
		{"/v2/public/base/blobs/" + ld, "", http.StatusNotFound},
		{"/v2/public/base/manifests/" + md, "", http.StatusNotFound},
		{"/v2/private/app/blobs/" + ld, "", http.StatusUnauthorized},
		{"/v2/private/app/manifests/" + md, "", http.StatusUnauthorized},
		{"/v2/private/app/blobs/" + ld, "Bearer other", http.StatusUnauthorized},
		{"/v2/private/app/manifests/" + md, "Bearer other", http.StatusUnauthorized},
	} {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			if got := fetch(t, method, mirror.URL+c.path, c.authz); got != c.want {
				t.Errorf("%s %s (authorization %q): %d, want %d as upstream answers", method, c.path, c.authz, got, c.want)
			}
		}
	}
	// The owner of the credentials still reads it from the cache.
	if got := fetch(t, http.MethodGet, mirror.URL+"/v2/private/app/blobs/"+ld, "Bearer good"); got != http.StatusOK {
		t.Fatalf("authorised GET of the cached blob: %d", got)
	}
}

// The same across registries: content cached from one registry is not
// served for another registry's repository that does not hold it.
func TestCachedContentIsNotServedAcrossRegistries(t *testing.T) {
	a, b := testregistry.New(t), testregistry.New(t)
	priv := a.Push(t, "private/app:v1", 1, 4096)
	b.Push(t, "public/base:v1", 1, 4096)
	gatePrivate(a)
	b.ScopeToRepos()
	mirror := startAgent(t, nil, a.URL(), b.URL())
	cachePrivate(t, mirror, priv, "?ns="+a.Host())
	nsB := "?ns=" + b.Host()
	if got := fetch(t, http.MethodGet, mirror.URL+"/v2/public/base/manifests/v1"+nsB, ""); got != http.StatusOK {
		t.Fatalf("anonymous GET of public/base on the second registry: %d", got)
	}

	md, ld := imageDigests(t, priv)
	for _, path := range []string{
		"/v2/public/base/blobs/" + ld, "/v2/public/base/manifests/" + md,
		"/v2/private/app/blobs/" + ld, "/v2/private/app/manifests/" + md,
	} {
		for _, authz := range []string{"", "Bearer good"} {
			if got := fetch(t, http.MethodGet, mirror.URL+path+nsB, authz); got != http.StatusNotFound {
				t.Errorf("GET %s%s (authorization %q): %d, want 404 as the second registry answers", path, nsB, authz, got)
			}
		}
	}
}
