package preheat

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// seeds records what the service handed to the seed; done is signalled
// once want blobs arrived.
type seeds struct {
	mu   sync.Mutex
	got  []swarmproto.TrackerRequest
	want int
	done chan struct{}
}

func (s *seeds) Ensure(req swarmproto.TrackerRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, req)
	if len(s.got) == s.want {
		close(s.done)
	}
}

func (s *seeds) digests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, r := range s.got {
		out = append(out, r.Digest)
	}
	slices.Sort(out)
	return out
}

// setup runs an in-process registry and a Service (one supernode) on a
// real loopback libp2p host.
func setup(t *testing.T, want int, cfg Config) (*httptest.Server, *Service, *seeds) {
	t.Helper()
	reg := httptest.NewServer(registry.New())
	t.Cleanup(reg.Close)
	regs, up, err := upstream.Open([]string{reg.URL}, upstream.Options{UserAgent: "preheat-test"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	h, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	sd := &seeds{want: want, done: make(chan struct{})}
	cfg.Registries, cfg.Upstream, cfg.Seed, cfg.Host, cfg.Log = regs, up, sd, h, zaptest.NewLogger(t)
	s := New(cfg)
	t.Cleanup(s.Close)
	return reg, s, sd
}

func push(t *testing.T, regURL, repo string, img v1.Image) string {
	t.Helper()
	u, _ := url.Parse(regURL)
	ref, err := name.NewTag(u.Host+"/"+repo+":v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	return d.String()
}

func blobsOf(t *testing.T, imgs ...v1.Image) []string {
	t.Helper()
	var out []string
	for _, img := range imgs {
		cfg, _ := img.ConfigName()
		out = append(out, cfg.String())
		ls, _ := img.Layers()
		for _, l := range ls {
			d, _ := l.Digest()
			out = append(out, d.String())
		}
	}
	slices.Sort(out)
	return out
}

func post(t *testing.T, s *Service, body, authz string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/registry/notifications", strings.NewReader(body))
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, req)
	return rec
}

func wait(t *testing.T, sd *seeds) {
	t.Helper()
	select {
	case <-sd.done:
	case <-t.Context().Done():
		t.Fatalf("seeded only %v", sd.digests())
	}
}

func TestIndexPreheatsOnlyConfiguredPlatforms(t *testing.T) {
	amd, _ := random.Image(1024, 2)
	arm, _ := random.Image(1024, 3)
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
	)
	for _, tc := range []struct {
		platforms []string
		want      []v1.Image
	}{
		{nil, []v1.Image{amd}}, // default linux/amd64
		{[]string{"linux/arm64/v8"}, []v1.Image{arm}},
		{[]string{"linux/amd64", "linux/arm64"}, []v1.Image{amd, arm}},
	} {
		t.Run(fmt.Sprint(tc.platforms), func(t *testing.T) {
			want := blobsOf(t, tc.want...)
			reg, s, sd := setup(t, len(want), Config{Platforms: tc.platforms})
			u, _ := url.Parse(reg.URL)
			ref, _ := name.NewTag(u.Host+"/lib/multi:v1", name.Insecure)
			if err := remote.WriteIndex(ref, idx); err != nil {
				t.Fatal(err)
			}
			d, _ := idx.Digest()
			body := fmt.Sprintf(`{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.index.v1+json","digest":%q,"repository":"lib/multi","url":"%s/v2/lib/multi/manifests/%s"}}]}`, d, reg.URL, d)
			if rec := post(t, s, body, ""); rec.Code != http.StatusOK {
				t.Fatalf("POST: %d %s", rec.Code, rec.Body)
			}
			wait(t, sd)
			if got := sd.digests(); !slices.Equal(got, want) {
				t.Errorf("seeded %v, want %v", got, want)
			}
			for _, r := range sd.got {
				if r.Registry != u.Host || r.Repo != "lib/multi" {
					t.Errorf("seed request %+v: wrong registry or repository", r)
				}
			}
		})
	}
}

func TestAuthAndEventFiltering(t *testing.T) {
	img, _ := random.Image(512, 1)
	want := blobsOf(t, img)
	reg, s, sd := setup(t, len(want), Config{Token: "tok", User: "harbor", Password: "pw"})
	d := push(t, reg.URL, "app/one", img)
	target := fmt.Sprintf(`"Repository":"app/one","URL":"%s/v2/app/one/manifests/%s","Digest":%q`, reg.URL, d, d)

	for name, authz := range map[string]string{"none": "", "wrong token": "Bearer nope", "wrong password": "Basic aGFyYm9yOm5vcGU="} {
		if rec := post(t, s, `{"events":[]}`, authz); rec.Code != http.StatusUnauthorized {
			t.Errorf("%s: %d, want 401", name, rec.Code)
		}
	}
	// Pulls and blob pushes are ignored; an invalid repository is a 400.
	ignored := fmt.Sprintf(`{"events":[{"action":"pull","target":{%s}},{"action":"push","target":{"mediaType":"application/octet-stream",%s}}]}`, target, target)
	if rec := post(t, s, ignored, "Bearer tok"); rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"accepted":0`) {
		t.Errorf("pull and blob events: %d %s, want 200 accepted 0", rec.Code, rec.Body)
	}
	if rec := post(t, s, `{"events":[{"action":"push","target":{"repository":"UPPER/case","tag":"v1"}}]}`, "Bearer tok"); rec.Code != http.StatusBadRequest {
		t.Errorf("invalid repository: %d, want 400", rec.Code)
	}
	// Harbor's Go-cased envelope with basic auth.
	harbor := fmt.Sprintf(`{"Events":[{"ID":"x","Action":"push","Target":{"MediaType":"application/vnd.docker.distribution.manifest.v2+json",%s}}]}`, target)
	if rec := post(t, s, harbor, "Basic aGFyYm9yOnB3"); rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"accepted":1`) {
		t.Fatalf("Harbor envelope: %d %s", rec.Code, rec.Body)
	}
	wait(t, sd)
	if got := sd.digests(); !slices.Equal(got, want) {
		t.Errorf("seeded %v, want %v", got, want)
	}
	// The job counts its result after its last hand-off to the seed:
	// Close waits for it.
	s.Close()
	if r, n := s.Counts(); r["ok"] != 1 || r["unauthorized"] != 3 || n != len(want) {
		t.Errorf("counts %v %d", r, n)
	}
}

func TestNotifyCLIClient(t *testing.T) {
	img, _ := random.Image(512, 1)
	want := blobsOf(t, img)
	reg, s, sd := setup(t, len(want), Config{Token: "tok"})
	push(t, reg.URL, "app/cli", img)
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	u, _ := url.Parse(reg.URL)
	ctx := context.Background()
	if err := Notify(ctx, srv.Client(), srv.URL, u.Host+"/app/cli:v1", ""); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("without the token: %v, want a 401 error", err)
	}
	if err := Notify(ctx, srv.Client(), srv.URL, u.Host+"/app/cli:v1", "Bearer tok"); err != nil {
		t.Fatal(err)
	}
	wait(t, sd)
	if got := sd.digests(); !slices.Equal(got, want) {
		t.Errorf("seeded %v, want %v", got, want)
	}
}

// TestBusyPastMaxPending: while MaxPending manifests are being fetched, a
// further notification is refused with 503 and Retry-After.
func TestBusyPastMaxPending(t *testing.T) {
	img, _ := random.Image(512, 1)
	want := blobsOf(t, img)
	release := make(chan struct{})
	inner := registry.New()
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/") {
			<-release // the preheat's manifest fetch waits here
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(reg.Close)
	regs, up, err := upstream.Open([]string{reg.URL}, upstream.Options{UserAgent: "preheat-test"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	h, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	sd := &seeds{want: len(want), done: make(chan struct{})}
	s := New(Config{Registries: regs, Upstream: up, Seed: sd, Host: h, MaxPending: 1, Log: zaptest.NewLogger(t)})
	t.Cleanup(s.Close)
	d := push(t, reg.URL, "app/busy", img)
	body := fmt.Sprintf(`{"events":[{"action":"push","target":{"repository":"app/busy","digest":%q,"url":"%s/v2/app/busy/manifests/%s"}}]}`, d, reg.URL, d)
	if rec := post(t, s, body, ""); rec.Code != http.StatusOK {
		t.Fatalf("first: %d %s", rec.Code, rec.Body)
	}
	rec := post(t, s, body, "")
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" {
		t.Errorf("second while the first runs: %d (Retry-After %q), want 503 with Retry-After", rec.Code, rec.Header().Get("Retry-After"))
	}
	close(release)
	wait(t, sd)
}
