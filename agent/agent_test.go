package agent_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/cputime"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

func startAgent(t *testing.T, mutate func(*agent.Config), registries ...string) *httptest.Server {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: registries}
	if mutate != nil {
		mutate(&cfg)
	}
	a, err := agent.New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		if err := a.Close(); err != nil {
			t.Error(err)
		}
	})
	return srv
}

// pull fetches an image through the mirror the way crane does and checks
// every blob against its digest.
func pull(t *testing.T, mirror *httptest.Server, repoTag string) v1.Hash {
	t.Helper()
	ref, err := name.ParseReference(strings.TrimPrefix(mirror.URL, "http://")+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		want, _ := l.Digest()
		rc, err := l.Compressed() // go-containerregistry verifies the digest as it reads
		if err != nil {
			t.Fatalf("layer %s: %v", want, err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, rc); err != nil {
			t.Fatalf("read layer %s: %v", want, err)
		}
		rc.Close()
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != want.String() {
			t.Fatalf("layer digest %s, want %s", got, want)
		}
	}
	if _, err := img.RawConfigFile(); err != nil {
		t.Fatalf("config: %v", err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestPullThroughAgentCachesBlobs(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "team/app:v1", 3, 256<<10)
	mirror := startAgent(t, nil, up.URL())

	want, _ := img.Digest()
	if got := pull(t, mirror, "team/app:v1"); got != want {
		t.Fatalf("digest %s, want %s", got, want)
	}
	if got := up.Count("GET blobs"); got != 4 { // 3 layers + config
		t.Fatalf("first pull made %d upstream blob GETs, want 4", got)
	}
	up.Reset()
	if got := pull(t, mirror, "team/app:v1"); got != want {
		t.Fatalf("second pull digest %s, want %s", got, want)
	}
	if n := up.Count("GET blobs") + up.Count("HEAD blobs"); n != 0 {
		t.Fatalf("second pull made %d upstream blob requests, want 0", n)
	}
}

func TestConcurrentRequestsMakeOneUpstreamFetch(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 4<<20)
	mirror := startAgent(t, nil, up.URL())
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	want, _ := io.ReadAll(must(layers[0].Compressed()))

	const clients = 10
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		wg.Go(func() {
			resp, err := http.Get(mirror.URL + "/v2/app/blobs/" + digest.String())
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, want) {
				errs <- fmt.Errorf("status %d, %d bytes, err %v", resp.StatusCode, len(got), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := up.Count("GET blobs"); got != 1 {
		t.Fatalf("%d clients caused %d upstream blob GETs, want 1", clients, got)
	}
}

// A client gets the first bytes of a blob while the upstream is still
// sending the rest.
func TestClientStreamsWhileFillRuns(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 2<<20)
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	want, _ := io.ReadAll(must(layers[0].Compressed()))
	release := make(chan struct{})
	up.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") {
			return false
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(want)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(want[:len(want)/2])
		w.(http.Flusher).Flush()
		<-release
		_, _ = w.Write(want[len(want)/2:])
		return true
	})
	mirror := startAgent(t, nil, up.URL())
	resp, err := http.Get(mirror.URL + "/v2/app/blobs/" + digest.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	head := make([]byte, 64<<10)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatalf("read first bytes while upstream holds the rest: %v", err)
	}
	close(release)
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(head, rest...), want) {
		t.Fatal("streamed bytes differ from the blob")
	}
}

func TestUnlistedRegistryIsRefusedWithoutUpstreamRequest(t *testing.T) {
	up := testregistry.New(t)
	mirror := startAgent(t, nil, up.URL())
	for _, path := range []string{
		"/v2/library/alpine/manifests/latest?ns=evil.example.com",
		"/v2/library/alpine/blobs/sha256:" + strings.Repeat("a", 64) + "?ns=docker.io",
	} {
		resp, err := http.Get(mirror.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		code := ociCode(t, resp)
		if resp.StatusCode != http.StatusForbidden || code != "DENIED" {
			t.Errorf("%s: status %d code %s, want 403 DENIED", path, resp.StatusCode, code)
		}
	}
	if n := up.Total(); n != 0 {
		t.Fatalf("upstream saw %d requests, want 0", n)
	}
}

func TestNamespaceSelectsRegistry(t *testing.T) {
	a, b := testregistry.New(t), testregistry.New(t)
	imgB := b.Push(t, "app:v1", 1, 1024)
	mirror := startAgent(t, nil, a.URL(), b.URL())
	want, _ := imgB.Digest()
	resp, err := http.Get(mirror.URL + "/v2/app/manifests/v1?ns=" + url.QueryEscape(b.Host()))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != want.String() {
		t.Fatalf("status %d digest %q, want 200 %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), want)
	}
	if a.Total() != 0 {
		t.Fatalf("default registry saw %d requests for another ns", a.Total())
	}
}

func TestUnauthorizedChallengeIsRelayed(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "private/app:v1", 1, 1024)
	up.RequireToken("good")
	mirror := startAgent(t, nil, up.URL())

	resp, err := http.Get(mirror.URL + "/v2/private/app/manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	code := ociCode(t, resp)
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != testregistry.Challenge || code != "UNAUTHORIZED" {
		t.Fatalf("got %d %q %s, want 401 with the upstream challenge", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), code)
	}

	// With the token the client got from the realm, the pull works, and
	// the blob lands in the cache.
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	req, _ := http.NewRequest(http.MethodGet, mirror.URL+"/v2/private/app/blobs/"+digest.String(), nil)
	req.Header.Set("Authorization", "Bearer good")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("authorized blob GET: %d", resp.StatusCode)
	}

	// A client without credentials must not get the cached private blob.
	resp, err = http.Get(mirror.URL + "/v2/private/app/blobs/" + digest.String())
	if err != nil {
		t.Fatal(err)
	}
	ociCode(t, resp)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("anonymous GET of a cached private blob: %d, want 401", resp.StatusCode)
	}
}

func TestTagIsResolvedUpstreamEveryTime(t *testing.T) {
	up := testregistry.New(t)
	first := up.Push(t, "app:latest", 1, 1024)
	mirror := startAgent(t, nil, up.URL())
	if got, want := pull(t, mirror, "app:latest"), must(first.Digest()); got != want {
		t.Fatalf("first: %s, want %s", got, want)
	}
	second := up.Push(t, "app:latest", 1, 1024)
	if got, want := pull(t, mirror, "app:latest"), must(second.Digest()); got != want {
		t.Fatalf("after the tag moved: %s, want %s", got, want)
	}
}

func TestCachedTagServedWhileUpstreamDown(t *testing.T) {
	up := testregistry.New(t)
	up.Push(t, "app:v1", 2, 1024)
	mirror := startAgent(t, nil, up.URL())
	want := pull(t, mirror, "app:v1")
	up.Server.Close()
	if got := pull(t, mirror, "app:v1"); got != want {
		t.Fatalf("with upstream down: %s, want %s", got, want)
	}
}

func TestBlobRangesAndHead(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 100_000)
	mirror := startAgent(t, nil, up.URL())
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	blob, _ := io.ReadAll(must(layers[0].Compressed()))
	size := len(blob)
	url := mirror.URL + "/v2/app/blobs/" + digest.String()

	// Twice: the first is served while filling, the second from disk.
	for _, round := range []string{"filling", "cached"} {
		if round == "filling" {
			resp, err := rangeGet(url, "bytes=10-19")
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(got, blob[10:20]) ||
				resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 10-19/%d", size) {
				t.Fatalf("%s: range 10-19: %d %q", round, resp.StatusCode, resp.Header.Get("Content-Range"))
			}
			continue
		}
		for _, tc := range []struct {
			rng    string
			status int
			want   []byte
		}{
			{"", 200, blob},
			{"bytes=10-19", 206, blob[10:20]},
			{fmt.Sprintf("bytes=%d-", size-5), 206, blob[size-5:]},
			{"bytes=-7", 206, blob[size-7:]},
			{fmt.Sprintf("bytes=%d-", size), 416, nil},
			{"bytes=0-1,5-6", 200, blob},
		} {
			resp, err := rangeGet(url, tc.rng)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || (tc.want != nil && !bytes.Equal(got, tc.want)) {
				t.Errorf("%s: Range %q: status %d, %d bytes; want %d, %d bytes", round, tc.rng, resp.StatusCode, len(got), tc.status, len(tc.want))
			}
		}
	}
	resp, err := http.Head(url)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || n != 0 || resp.ContentLength != int64(size) || resp.Header.Get("Docker-Content-Digest") != digest.String() {
		t.Fatalf("HEAD: %d, body %d, length %d", resp.StatusCode, n, resp.ContentLength)
	}
}

func TestMalformedRequestsGetOCIErrors(t *testing.T) {
	up := testregistry.New(t)
	mirror := startAgent(t, nil, up.URL())
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/blobs/md5:0123", 400, "DIGEST_INVALID"},
		{"GET", "/v2/App/manifests/latest", 400, "NAME_INVALID"},
		{"GET", "/v2/app/manifests/-bad", 400, "MANIFEST_INVALID"},
		{"PUT", "/v2/app/manifests/latest", 405, "UNSUPPORTED"},
		{"GET", "/v2/app/tags/list", 404, "UNSUPPORTED"},
	} {
		req, _ := http.NewRequest(tc.method, mirror.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if code := ociCode(t, resp); resp.StatusCode != tc.status || code != tc.code {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, code, tc.status, tc.code)
		}
	}
	if n := up.Total(); n != 0 {
		t.Fatalf("malformed requests reached upstream %d times", n)
	}
}

func rangeGet(url, rng string) (*http.Response, error) {
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	return http.DefaultClient.Do(req)
}

func ociCode(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var body struct {
		Errors []struct{ Code string } `json:"errors"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || len(body.Errors) == 0 {
		t.Errorf("status %d: no OCI error body (%v)", resp.StatusCode, err)
		return ""
	}
	return body.Errors[0].Code
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// BenchmarkWarmBlobServe serves a cached 64 MiB blob through the proxy
// over loopback HTTP (re-hashed as it is read).
func BenchmarkWarmBlobServe(b *testing.B) {
	up := testregistry.New(b)
	img := up.Push(b, "app:v1", 1, 64<<20)
	cfg := agent.DefaultConfig()
	cfg.DataDir = b.TempDir()
	cfg.Registries = config.Strings{Values: []string{up.URL()}}
	a, err := agent.New(cfg, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	defer func() { srv.Close(); a.Close() }()
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	url := srv.URL + "/v2/app/blobs/" + digest.String()
	get := func() {
		resp, err := http.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != size {
			b.Fatalf("read %d of %d: %v", n, size, err)
		}
	}
	get() // warm the cache
	b.SetBytes(size)
	cpu := cputime.Start()
	for b.Loop() {
		get()
	}
	// Client and agent share the process: MB/cpu-s counts both ends.
	cpu.Report(b, int64(b.N)*size)
}

func TestHeadOfUncachedBlobDoesNotFetchIt(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 1<<20)
	mirror := startAgent(t, nil, up.URL())
	layers, _ := img.Layers()
	digest, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	resp, err := http.Head(mirror.URL + "/v2/app/blobs/" + digest.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ContentLength != size {
		t.Fatalf("HEAD: %d, length %d, want 200 and %d", resp.StatusCode, resp.ContentLength, size)
	}
	if n := up.Count("GET blobs"); n != 0 {
		t.Fatalf("HEAD made %d upstream blob GETs", n)
	}
}

func TestManifestPullPrefetchesBlobs(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 64<<10)
	mirror := startAgent(t, nil, up.URL())
	resp, err := http.Get(mirror.URL + "/v2/app/manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	// Config and both layers are fetched without any client asking.
	deadline := time.Now().Add(10 * time.Second)
	for up.Count("GET blobs") < 3 && time.Now().Before(deadline) {
		<-time.After(5 * time.Millisecond) // polling a counter; nothing to wait on
	}
	if n := up.Count("GET blobs"); n != 3 {
		t.Fatalf("upstream saw %d blob GETs after a manifest pull, want 3", n)
	}
	// And the pull that follows is served from the cache.
	want, _ := img.Digest()
	if got := pull(t, mirror, "app:v1"); got != want {
		t.Fatalf("digest %s, want %s", got, want)
	}
	if n := up.Count("GET blobs"); n != 3 {
		t.Fatalf("upstream saw %d blob GETs in all, want 3", n)
	}
}

// headTag resolves a tag the way containerd does: a HEAD of the tag, with
// containerd's Accept list, reading Docker-Content-Digest.
func headTag(t *testing.T, mirror *httptest.Server, repo, tag string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodHead, mirror.URL+"/v2/"+repo+"/manifests/"+tag, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, mt := range []string{"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
		"application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json", "*/*"} {
		req.Header.Add("Accept", mt)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Docker-Content-Digest")
}

// TestTagResolvedByHeadServedWhileUpstreamDown is containerd alone: it
// resolves the tag with a HEAD and pulls everything else by digest. When the
// registry then goes away, the tag still resolves from the cache, to the
// same digest, and the image pulls by that digest.
func TestTagResolvedByHeadServedWhileUpstreamDown(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 1024)
	want := must(img.Digest())
	mirror := startAgent(t, nil, up.URL())
	if code, d := headTag(t, mirror, "app", "v1"); code != http.StatusOK || d != want.String() {
		t.Fatalf("HEAD of the tag: %d %q, want 200 %s", code, d, want)
	}
	if got := pull(t, mirror, "app@"+want.String()); got != want {
		t.Fatalf("pull by digest: %s, want %s", got, want)
	}
	up.Server.Close()
	if code, d := headTag(t, mirror, "app", "v1"); code != http.StatusOK || d != want.String() {
		t.Fatalf("HEAD of the tag with upstream down: %d %q, want 200 %s", code, d, want)
	}
	if got := pull(t, mirror, "app@"+want.String()); got != want {
		t.Fatalf("pull by digest with upstream down: %s, want %s", got, want)
	}
}

// TestHeadOfTagCachesTheManifest: a client that only HEADs a tag has the
// manifest it names cached, so the tag is served in full while upstream is
// down.
func TestHeadOfTagCachesTheManifest(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 1024)
	want := must(img.Digest())
	mirror := startAgent(t, func(c *agent.Config) { c.Prefetch = false }, up.URL())
	if code, d := headTag(t, mirror, "app", "v1"); code != http.StatusOK || d != want.String() {
		t.Fatalf("HEAD of the tag: %d %q, want 200 %s", code, d, want)
	}
	up.Server.Close()
	resp, err := http.Get(mirror.URL + "/v2/app/manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := sha256.Sum256(body)
	if resp.StatusCode != http.StatusOK || "sha256:"+hex.EncodeToString(sum[:]) != want.String() {
		t.Fatalf("GET of the tag with upstream down: %d, body hashes to sha256:%x, want 200 and %s", resp.StatusCode, sum, want)
	}
}

// TestUnreachableUpstreamCauseInOCIError: a registry named without a scheme
// (HTTPS) that speaks plain HTTP. The client's error says why, for
// manifests and blobs alike, without internal details.
func TestUnreachableUpstreamCauseInOCIError(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 1024)
	layer := must(must(img.Layers())[0].Digest())
	mirror := startAgent(t, func(c *agent.Config) { c.AuthTTL = -1 }, strings.TrimPrefix(up.URL(), "http://"))
	for _, path := range []string{"/v2/app/manifests/v1", "/v2/app/blobs/" + layer.String()} {
		// With credentials of its own, the client's request goes upstream as
		// configured (the anonymous token flow may find plain HTTP by itself
		// on loopback).
		req, _ := http.NewRequest(http.MethodGet, mirror.URL+path, nil)
		req.Header.Set("Authorization", "Basic dXNlcjpwYXNz")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			Errors []struct{ Code, Message string } `json:"errors"`
		}
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil || len(body.Errors) != 1 {
			t.Fatalf("GET %s: %d, no OCI error body: %v", path, resp.StatusCode, err)
		}
		const cause = "server gave HTTP response to HTTPS client"
		if msg := body.Errors[0].Message; resp.StatusCode != http.StatusBadGateway || !strings.Contains(msg, cause) || strings.Contains(msg, "/v2/") {
			t.Errorf("GET %s: %d %q, want 502 naming the cause %q and no URL path", path, resp.StatusCode, msg, cause)
		}
	}
}
