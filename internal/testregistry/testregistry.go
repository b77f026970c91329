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
	egress atomic.Int64
	limit  *ratelimit.Limiter
}

// New starts a Registry, closed when the test ends.
func New(t testing.TB) *Registry {
	t.Helper()
	u := &Registry{counts: map[string]int{}, paths: map[string]int{}}
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
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			w = &countingWriter{ResponseWriter: w, n: &u.egress, out: u.limit.Writer(r.Context(), w)}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.Server.Close)
	return u
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
	u.Reset()
	return img
}
