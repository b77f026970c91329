package manifests

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
)

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newService(t *testing.T, reg *testregistry.Registry, cfg Config) (*Service, *clock) {
	t.Helper()
	regs, up, err := upstream.Open([]string{reg.URL()}, upstream.Options{Keychain: authn.NewMultiKeychain()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(store.Options{Dir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	cfg.Now = clk.Now
	if cfg.AuthTTL == 0 {
		cfg.AuthTTL = 5 * time.Minute
	}
	return New(cfg, regs, up, st, zaptest.NewLogger(t)), clk
}

func digestOf(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

func resolve(t *testing.T, s *Service, reg *testregistry.Registry, repo, ref, authz string) (*Answer, error) {
	t.Helper()
	req := &swarmproto.ManifestRequest{Registry: reg.Host(), Repo: repo, Ref: ref, Authorization: authz}
	if err := req.Validate(); err != nil {
		t.Fatal(err)
	}
	return s.Resolve(context.Background(), req)
}

// upstreamCounts is what the registry saw for manifests.
func upstreamCounts(reg *testregistry.Registry) (heads, gets int) {
	return reg.Count("HEAD manifests"), reg.Count("GET manifests")
}

// Concurrent resolutions of one tag make one upstream HEAD and one GET,
// even with no TTL, and even when the first asker gives up waiting.
func TestConcurrentResolutionsShareOneUpstreamRequest(t *testing.T) {
	reg := testregistry.New(t)
	img := reg.Push(t, "app:v1", 1, 1024)
	s, _ := newService(t, reg, Config{TagTTL: 0})

	release := make(chan struct{})
	reg.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodHead {
			<-release
		}
		return false
	})
	const n = 16
	waiting := make(chan struct{}, n)
	s.onWait = func() { waiting <- struct{}{} }

	// The first asker leaves before upstream answers: the shared fetch
	// must go on for the others.
	gone, cancel := context.WithCancel(context.Background())
	firstErr := make(chan error, 1)
	go func() {
		_, err := s.Resolve(gone, &swarmproto.ManifestRequest{Registry: reg.Host(), Repo: "app", Ref: "v1"})
		firstErr <- err
	}()
	<-waiting
	cancel()
	if err := <-firstErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled asker: %v", err)
	}

	var wg sync.WaitGroup
	answers := make([]*Answer, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			answers[i], errs[i] = s.Resolve(context.Background(), &swarmproto.ManifestRequest{Registry: reg.Host(), Repo: "app", Ref: "v1"})
		})
	}
	for range n {
		<-waiting
	}
	close(release)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || answers[i].Digest != digestOf(t, img) {
			t.Fatalf("asker %d: %v %+v", i, errs[i], answers[i])
		}
	}
	if h, g := upstreamCounts(reg); h != 1 || g != 1 {
		t.Fatalf("upstream saw %d manifest HEADs and %d GETs, want 1 and 1", h, g)
	}
	if st := s.Stats(); st.UpstreamHEADs != 1 || st.UpstreamGETs != 1 {
		t.Fatalf("Stats() = %+v, want the registry's own counts", st)
	}
}

// A tag is resolved upstream once per TagTTL (a HEAD); the manifest it
// names is fetched once and kept; a moved tag is seen after the TTL.
func TestTagResolvedOncePerTTL(t *testing.T) {
	reg := testregistry.New(t)
	v1img := reg.Push(t, "app:latest", 1, 1024)
	s, clk := newService(t, reg, Config{TagTTL: time.Second})

	for range 5 {
		ans, err := resolve(t, s, reg, "app", "latest", "")
		if err != nil || ans.Digest != digestOf(t, v1img) {
			t.Fatalf("resolve: %v %+v", err, ans)
		}
		clk.Advance(100 * time.Millisecond)
	}
	if h, g := upstreamCounts(reg); h != 1 || g != 1 {
		t.Fatalf("within the TTL: %d HEADs, %d GETs; want 1, 1", h, g)
	}
	clk.Advance(time.Second)
	if _, err := resolve(t, s, reg, "app", "latest", ""); err != nil {
		t.Fatal(err)
	}
	if h, g := upstreamCounts(reg); h != 2 || g != 1 {
		t.Fatalf("after the TTL: %d HEADs, %d GETs; want 2 (the tag again), 1 (manifest kept)", h, g)
	}

	v2img := reg.Push(t, "app:latest", 1, 2048) // resets counts
	if ans, _ := resolve(t, s, reg, "app", "latest", ""); ans.Digest != digestOf(t, v1img) {
		t.Fatalf("within the TTL the old digest is still answered, got %s", ans.Digest)
	}
	clk.Advance(time.Second)
	ans, err := resolve(t, s, reg, "app", "latest", "")
	if err != nil || ans.Digest != digestOf(t, v2img) {
		t.Fatalf("moved tag not seen after the TTL: %v %+v", err, ans)
	}
	// By digest, the new manifest is now answered from the cache.
	if _, err := resolve(t, s, reg, "app", digestOf(t, v2img), ""); err != nil {
		t.Fatal(err)
	}
	if h, g := upstreamCounts(reg); h != 1 || g != 1 {
		t.Fatalf("moved tag: %d HEADs, %d GETs; want 1, 1", h, g)
	}
}

// TagTTL 0 sends every resolution upstream.
func TestZeroTagTTLAsksUpstreamEveryTime(t *testing.T) {
	reg := testregistry.New(t)
	reg.Push(t, "app:v1", 1, 1024)
	s, _ := newService(t, reg, Config{TagTTL: 0})
	for range 3 {
		if _, err := resolve(t, s, reg, "app", "v1", ""); err != nil {
			t.Fatal(err)
		}
	}
	if h, g := upstreamCounts(reg); h != 3 || g != 1 {
		t.Fatalf("%d HEADs, %d GETs; want 3, 1", h, g)
	}
}

func status(err error) int {
	var oe *ocierr.Error
	if errors.As(err, &oe) {
		return oe.Status
	}
	return 0
}

// A private repository is answered only to credentials upstream accepted:
// never from the cache to a client without them or with wrong ones.
func TestPrivateRepositoryNeedsAcceptedCredentials(t *testing.T) {
	reg := testregistry.New(t)
	img := reg.Push(t, "private/app:v1", 1, 1024)
	reg.RequireToken("secret")
	s, _ := newService(t, reg, Config{TagTTL: time.Hour})
	digest := digestOf(t, img)

	ans, err := resolve(t, s, reg, "private/app", "v1", "Bearer secret")
	if err != nil || ans.Digest != digest {
		t.Fatalf("accepted credentials: %v", err)
	}
	// The tag and manifest are now cached: other credentials still go upstream.
	for _, authz := range []string{"", "Bearer wrong"} {
		for _, ref := range []string{"v1", digest} {
			ans, err := resolve(t, s, reg, "private/app", ref, authz)
			if status(err) != http.StatusUnauthorized {
				t.Fatalf("%s with %q: answered %v (err %v); want upstream's 401", ref, authz, ans != nil, err)
			}
		}
	}
	// The accepted credentials read it by digest from the cache: no GET.
	reg.Reset()
	if ans, err := resolve(t, s, reg, "private/app", digest, "Bearer secret"); err != nil || ans.Digest != digest {
		t.Fatalf("by digest: %v", err)
	}
	if h, g := upstreamCounts(reg); h != 0 || g != 0 {
		t.Fatalf("%d HEADs, %d GETs for credentials accepted a moment ago; want 0, 0", h, g)
	}
	// Another repository is another question, even for the same digest.
	if _, err := resolve(t, s, reg, "other/app", digest, "Bearer secret"); status(err) != http.StatusNotFound {
		t.Fatalf("digest asked in a repository that lacks it: %v, want upstream's 404", err)
	}
}

// With upstream down, a tag resolved before is answered (stale) to the
// credentials that resolved it, and to nobody else.
func TestStaleTagWhileUpstreamDown(t *testing.T) {
	reg := testregistry.New(t)
	img := reg.Push(t, "app:v1", 1, 1024)
	s, clk := newService(t, reg, Config{TagTTL: time.Second})
	if _, err := resolve(t, s, reg, "app", "v1", ""); err != nil {
		t.Fatal(err)
	}
	reg.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	clk.Advance(time.Hour)
	ans, err := resolve(t, s, reg, "app", "v1", "")
	if err != nil || !ans.Stale || ans.Digest != digestOf(t, img) {
		t.Fatalf("stale tag: %v %+v", err, ans)
	}
	if n := s.Stats().StaleAnswers; n != 1 {
		t.Fatalf("%d stale answers counted, want 1", n)
	}
	if _, err := resolve(t, s, reg, "app", "v1", "Bearer never-seen"); err == nil {
		t.Fatal("credentials that never resolved the tag got a stale answer")
	}
	if _, err := resolve(t, s, reg, "app", "v2", ""); err == nil {
		t.Fatal("unknown tag answered while upstream is down")
	}
}

// Clients with different credentials resolving one tag at once each get
// their own HEAD (upstream must accept each of them), but the manifest
// the tag names is fetched once.
func TestDifferentCredentialsShareOneManifestGET(t *testing.T) {
	reg := testregistry.New(t)
	img := reg.Push(t, "app:v1", 1, 1024)
	s, _ := newService(t, reg, Config{TagTTL: time.Hour})
	// Both HEADs are answered together, and the manifest's GET is held
	// until both resolutions are after it.
	var heads, bodies sync.WaitGroup
	heads.Add(2)
	bodies.Add(2)
	s.onBody = bodies.Done
	reg.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		switch r.Method {
		case http.MethodHead:
			heads.Done()
			heads.Wait()
		case http.MethodGet:
			bodies.Wait()
		}
		return false
	})
	var wg sync.WaitGroup
	for _, authz := range []string{"Bearer alice", "Bearer bob"} {
		wg.Go(func() {
			ans, err := resolve(t, s, reg, "app", "v1", authz)
			if err != nil || ans.Digest != digestOf(t, img) {
				t.Errorf("%s: %v", authz, err)
			}
		})
	}
	wg.Wait()
	if h, g := upstreamCounts(reg); h != 2 || g != 1 {
		t.Fatalf("%d HEADs, %d GETs; want 2 (one per credentials), 1", h, g)
	}
}

// 10,000 agents asking for one tag at once (a rollout at the scale of the
// simulator) cost the registry one HEAD and one GET.
func TestTenThousandAskersOneUpstreamRequest(t *testing.T) {
	reg := testregistry.New(t)
	img := reg.Push(t, "app:v1", 1, 1024)
	s, _ := newService(t, reg, Config{TagTTL: time.Second})
	const n = 10_000
	var wg sync.WaitGroup
	var failed sync.Map
	for i := range n {
		wg.Go(func() {
			ans, err := s.Resolve(context.Background(), &swarmproto.ManifestRequest{Registry: reg.Host(), Repo: "app", Ref: "v1"})
			if err != nil || ans.Digest != digestOf(t, img) {
				failed.Store(i, err)
			}
		})
	}
	wg.Wait()
	failed.Range(func(k, v any) bool {
		t.Errorf("asker %v: %v", k, v)
		return false
	})
	if h, g := upstreamCounts(reg); h != 1 || g != 1 {
		t.Fatalf("%d askers: %d HEADs, %d GETs; want 1, 1", n, h, g)
	}
}
