// Package testregistry is an in-process upstream for tests:
// go-containerregistry's registry behind a handler that counts requests
// per method, kind and path, and can demand a bearer token or intercept
// requests.
package testregistry

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/starling-oci/starling/pkg/ratelimit"
)

// Challenge is the WWW-Authenticate value sent when a token is required.
const Challenge = `Bearer realm="https://auth.example.com/token",service="registry.example.com"`

// Registry is a counting upstream.
type Registry struct {
	Server *httptest.Server

	mu     sync.Mutex
	counts map[string]int // "GET blobs", "HEAD manifests", ...
	paths  map[string]int // "GET /v2/app/blobs/sha256:..."
	token  string
	gate   func(w http.ResponseWriter, r *http.Request) bool
	// scoped: blobs and manifests by digest are answered only in the
	// repositories Push put them in (repo -> digests).
	scoped bool
	inRepo map[string]map[string]bool
	egress atomic.Int64
	limit  *ratelimit.Limiter
}

// New starts a Registry, closed when the test ends.
func New(t testing.TB) *Registry {
	t.Helper()
	u := &Registry{counts: map[string]int{}, paths: map[string]int{}, inRepo: map[string]map[string]bool{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := "other"
		for _, k := range []string{"blobs", "manifests"} {
			if strings.Contains(r.URL.Path, "/"+k+"/") {
				kind = k
			}
		}
		u.mu.Lock()
		u.counts[r.Method+" "+kind]++
		u.paths[r.Method+" "+r.URL.Path]++
		token, gate := u.token, u.gate
		hidden := u.scoped && !u.visible(r.URL.Path)
		u.mu.Unlock()
		if token != "" && r.Header.Get("Authorization") != "Bearer "+token {
			w.Header().Set("WWW-Authenticate", Challenge)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		if gate != nil && gate(w, r) {
			return
		}
		if hidden && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = io.WriteString(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"not in this repository"}]}`)
			return
		}
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			w = &countingWriter{ResponseWriter: w, n: &u.egress, out: u.limit.Writer(r.Context(), w)}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.Server.Close)
	return u
}

// ScopeToRepos makes blobs and manifests by digest answer only in the
// repositories Push put them in, as real registries do (go-containerregistry's
// in-memory registry shares them across repositories); elsewhere they are
// 404.
func (u *Registry) ScopeToRepos() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.scoped = true
}

// visible reports whether a path by digest names something pushed to its
// repository; paths by tag and other paths are always visible. Callers
// hold mu.
func (u *Registry) visible(path string) bool {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return true
	}
	for _, k := range []string{"/blobs/", "/manifests/"} {
		if i := strings.LastIndex(rest, k); i >= 0 {
			repo, ref := rest[:i], rest[i+len(k):]
			if !strings.HasPrefix(ref, "sha256:") {
				return true
			}
			return u.inRepo[repo][ref]
		}
	}
	return true
}

// LimitEgress caps what the registry sends, shared by all clients, in
// bytes/s; call it before serving.
func (u *Registry) LimitEgress(bytesPerSec int64) { u.limit = ratelimit.New(bytesPerSec) }

// Egress returns the bytes sent in responses to GET and HEAD.
func (u *Registry) Egress() int64 { return u.egress.Load() }

type countingWriter struct {
	http.ResponseWriter
	n   *atomic.Int64
	out io.Writer
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.out.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// URL is the registry's base URL.
func (u *Registry) URL() string { return u.Server.URL }

// Host is the registry's host:port.
func (u *Registry) Host() string { return strings.TrimPrefix(u.Server.URL, "http://") }

// RequireToken makes every request need "Authorization: Bearer <token>".
func (u *Registry) RequireToken(token string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.token = token
}

// SetGate installs a hook that may answer a request itself (returning true).
func (u *Registry) SetGate(gate func(w http.ResponseWriter, r *http.Request) bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.gate = gate
}

// Count returns the requests seen for "METHOD kind" (kind: blobs, manifests, other).
func (u *Registry) Count(key string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[key]
}

// BlobGETs returns how many times each blob was fetched, by digest.
func (u *Registry) BlobGETs() map[string]int {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := map[string]int{}
	for k, n := range u.paths {
		if rest, ok := strings.CutPrefix(k, "GET "); ok && strings.Contains(rest, "/blobs/") {
			out[rest[strings.LastIndex(rest, "/")+1:]] += n
		}
	}
	return out
}

// Total returns every request seen.
func (u *Registry) Total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.counts {
		n += c
	}
	return n
}

// Reset forgets the counts.
func (u *Registry) Reset() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.counts, u.paths = map[string]int{}, map[string]int{}
	u.egress.Store(0)
}

// Push writes a random image as repoTag and resets the counts.
func (u *Registry) Push(t testing.TB, repoTag string, layers int, size int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, int64(layers))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(u.Host()+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	digests := []string{}
	for _, d := range []func() (v1.Hash, error){img.Digest, img.ConfigName} {
		h, err := d()
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, h.String())
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		h, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, h.String())
	}
	repo := ref.Context().RepositoryStr()
	u.mu.Lock()
	if u.inRepo[repo] == nil {
		u.inRepo[repo] = map[string]bool{}
	}
	for _, d := range digests {
		u.inRepo[repo][d] = true
	}
	u.mu.Unlock()
	u.Reset()
	return img
}
