package harness_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestMain doubles as a fake starling binary: when the test binary is run as
// `harness.test agent ...` or `harness.test supernode ...` it behaves like
// the real thing as far as the address-file contract goes, so that
// StartAgent and StartSupernode are tested before cmd/starling exists.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && (os.Args[1] == "agent" || os.Args[1] == "supernode") {
		os.Exit(fakeStarling(os.Args[1], os.Args[2:]))
	}
	harness.Main(m)
}

const (
	testLayers    = 3
	testLayerSize = 256 << 10
)

func TestRegistryPushAndAccessLog(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	if !strings.HasPrefix(reg.Addr(), "127.0.0.1:") || reg.URL() != "http://"+reg.Addr() {
		t.Fatalf("Addr %q, URL %q", reg.Addr(), reg.URL())
	}
	img, _ := harness.PushRandomImage(t, reg.Addr(), "e2e/pushed", "v1", testLayers, testLayerSize)
	blobs := mustBlobDigests(t, img)

	// Every blob was uploaded: the final PUT of an upload names its digest.
	reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		for _, d := range blobs {
			if !slices.ContainsFunc(reqs, func(q harness.Request) bool {
				return q.Method == http.MethodPut && q.Status == http.StatusCreated &&
					strings.HasPrefix(q.Path, "/v2/e2e/pushed/blobs/uploads/") &&
					strings.Contains(q.Path, "digest="+url.QueryEscape(d.String()))
			}) {
				return false
			}
		}
		return true
	})

	// Fetch one layer with a recognisable user agent and find that GET.
	layer := blobs[1]
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, reg.URL()+"/v2/e2e/pushed/blobs/"+layer.String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("User-Agent", "harness-selftest/1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET blob: %v", err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET blob: status %d, read %d bytes: %v", resp.StatusCode, n, err)
	}
	reqs := reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		return len(harness.FilterRequests(reqs, http.MethodGet, "/v2/e2e/pushed/blobs/")) > 0
	})
	gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/e2e/pushed/blobs/")
	if len(gets) != 1 {
		t.Fatalf("want 1 blob GET, got:\n%s", harness.FormatRequests(gets))
	}
	g := gets[0]
	if g.UserAgent != "harness-selftest/1" || g.Status != http.StatusOK || g.Written != n ||
		g.Digest() != layer.String() || !strings.HasPrefix(g.RemoteAddr, "127.0.0.1:") || g.Time.IsZero() {
		t.Errorf("unexpected blob GET record: %+v (read %d bytes of %s)", g, n, layer)
	}
	if got := reg.BlobGETs("e2e/pushed"); len(got) != 1 || got[0] != g {
		t.Errorf("BlobGETs = %+v, want [%+v]", got, g)
	}
	if got := reg.BlobGETs("e2e/other"); len(got) != 0 {
		t.Errorf("BlobGETs(other repo) = %+v", got)
	}

	// A failed request is logged too, with its status.
	missing := "/v2/e2e/pushed/blobs/sha256:" + strings.Repeat("0", 64)
	resp, err = http.Get(reg.URL() + missing)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		return slices.ContainsFunc(reqs, func(q harness.Request) bool {
			return q.Method == http.MethodGet && q.Path == missing && q.Status == http.StatusNotFound
		})
	})

	reg.Stop()
	reg.Stop() // idempotent
	select {
	case <-reg.Process().Exited():
	default:
		t.Errorf("registry still running after Stop")
	}
}

func TestRegistryBasicAuth(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	reg := harness.StartRegistry(t, harness.RegistryOptions{Users: map[string]string{"alice": "s3cret"}})

	resp, err := http.Get(reg.URL() + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
		t.Fatalf("anonymous GET /v2/: %d %q, want 401 with a Basic challenge", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}

	img, ref := harness.PushRandomImage(t, reg.Addr(), "private/img", "v1", 1, 1024,
		remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	_, err = remote.Image(ref, remote.WithContext(t.Context()), remote.WithAuth(&authn.Basic{Username: "alice", Password: "wrong"}))
	if err == nil {
		t.Fatalf("pull with a wrong password succeeded")
	}
	got, err := remote.Image(ref, remote.WithContext(t.Context()), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	if err != nil {
		t.Fatalf("pull with credentials: %v", err)
	}
	if gd, wd := mustDigest(t, got), mustDigest(t, img); gd != wd {
		t.Fatalf("pulled %s, pushed %s", gd, wd)
	}

	// Refusals are in the access log as 401s.
	reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		return slices.ContainsFunc(reqs, func(q harness.Request) bool {
			return q.Status == http.StatusUnauthorized && q.Path == "/v2/private/img/manifests/v1"
		}) && slices.ContainsFunc(reqs, func(q harness.Request) bool {
			return q.Status == http.StatusOK && q.Path == "/v2/private/img/manifests/v1"
		})
	})
}

func TestContainerdPullDirect(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	ctd := harness.StartContainerd(t)
	img, ref := harness.PushRandomImage(t, reg.Addr(), "e2e/ctr", "v1", testLayers, testLayerSize)

	hosts := t.TempDir()
	if err := harness.WriteHostsToml(hosts, reg.Addr(), ""); err != nil {
		t.Fatal(err)
	}
	if err := ctd.Pull(t, ref.String(), hosts); err != nil {
		t.Fatal(err)
	}
	assertContent(t, ctd, img)

	// containerd fetched every blob once, straight from the registry.
	blobs := mustBlobDigests(t, img)
	reqs := reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		return len(harness.FilterRequests(reqs, http.MethodGet, "/v2/e2e/ctr/blobs/")) >= len(blobs)
	})
	gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/e2e/ctr/blobs/")
	counts := harness.CountByDigest(gets)
	for _, d := range blobs {
		if counts[d.String()] != 1 {
			t.Errorf("blob %s fetched %d times, want 1:\n%s", d, counts[d.String()], harness.FormatRequests(gets))
		}
	}
	for _, q := range gets {
		if !strings.HasPrefix(q.UserAgent, "containerd/") || strings.Contains(q.Path, "ns=") {
			t.Errorf("unexpected blob GET: %+v", q)
		}
	}

	// The layers were unpacked into the native snapshotter.
	out, err := ctd.Ctr(t, "snapshots", "--snapshotter", harness.ContainerdSnapshotter, "ls")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out, "Committed"); n != testLayers {
		t.Errorf("want %d committed snapshots, got:\n%s", testLayers, out)
	}

	// A hosts.toml ctr cannot parse is an error, not a silent fallback to
	// default hosts (which would succeed here: the content is local).
	bad := t.TempDir()
	if err := os.MkdirAll(filepath.Join(bad, reg.Addr()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bad, reg.Addr(), "hosts.toml"), []byte("server = \"http://127.0.0.1:1\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := ctd.Pull(t, ref.String(), bad); err == nil || !strings.Contains(err.Error(), "could not parse") {
		t.Errorf("Pull with an unparsable hosts.toml: %v", err)
	}
}

func TestContainerdPullThroughMirror(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	ctd := harness.StartContainerd(t)
	img, ref := harness.PushRandomImage(t, reg.Addr(), "e2e/mirrored", "v1", testLayers, testLayerSize)
	mirror := startRecordingMirror(t, reg.Addr())

	hosts := t.TempDir()
	if err := harness.WriteHostsToml(hosts, reg.Addr(), mirror.addr); err != nil {
		t.Fatal(err)
	}
	if err := ctd.Pull(t, ref.String(), hosts); err != nil {
		t.Fatal(err)
	}
	assertContent(t, ctd, img)

	// Every request reached the mirror, with ?ns=<registry>, and nothing
	// fell back to the registry directly.
	seen := mirror.requests()
	if len(seen) == 0 {
		t.Fatal("the mirror saw no request")
	}
	for _, u := range seen {
		if u.Query().Get("ns") != reg.Addr() {
			t.Errorf("mirror request %s lacks ns=%s", u, reg.Addr())
		}
	}
	for _, d := range mustBlobDigests(t, img) {
		if !slices.ContainsFunc(seen, func(u *url.URL) bool { return u.Path == "/v2/e2e/mirrored/blobs/"+d.String() }) {
			t.Errorf("blob %s not fetched through the mirror; mirror saw %v", d, seen)
		}
	}
	// The push came from go-containerregistry; the pull must not have
	// reached the registry except through the mirror.
	for _, q := range reg.AccessLog() {
		if strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("containerd fell back to the registry: %+v", q)
		}
	}
}

func TestSkopeoCopyDirect(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "skopeo")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	img, ref := harness.PushRandomImage(t, reg.Addr(), "e2e/skopeo", "v1", testLayers, testLayerSize)
	conf := filepath.Join(t.TempDir(), "registries.conf")
	if err := harness.WriteRegistriesConf(conf, reg.Addr(), ""); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "dir:"+dst, conf); err != nil {
		t.Fatal(err)
	}
	assertDirLayout(t, dst, img)

	// Also to an OCI layout, with an empty (not the host's) registries.conf:
	// --src-tls-verify=false alone allows plain HTTP.
	oci := t.TempDir()
	if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "oci:"+oci+":v1", ""); err != nil {
		t.Fatal(err)
	}
	// Layers only: converting a Docker manifest to OCI rewrites the config.
	for _, d := range mustBlobDigests(t, img)[1:] {
		if _, err := os.Stat(filepath.Join(oci, "blobs", d.Algorithm, d.Hex)); err != nil {
			t.Errorf("OCI layout lacks blob %s: %v", d, err)
		}
	}
}

func TestSkopeoCopyThroughMirror(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "skopeo")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	img, ref := harness.PushRandomImage(t, reg.Addr(), "e2e/skopeo-mirrored", "v1", testLayers, testLayerSize)
	mirror := startRecordingMirror(t, reg.Addr())
	conf := filepath.Join(t.TempDir(), "registries.conf")
	if err := harness.WriteRegistriesConf(conf, reg.Addr(), mirror.addr); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	if err := harness.SkopeoCopy(t, "docker://"+ref.String(), "dir:"+dst, conf); err != nil {
		t.Fatal(err)
	}
	assertDirLayout(t, dst, img)

	seen := mirror.requests()
	for _, d := range mustBlobDigests(t, img) {
		if !slices.ContainsFunc(seen, func(u *url.URL) bool { return u.Path == "/v2/e2e/skopeo-mirrored/blobs/"+d.String() }) {
			t.Errorf("blob %s not fetched through the mirror; mirror saw %v", d, seen)
		}
	}
	for _, u := range seen {
		if u.Query().Has("ns") {
			t.Errorf("skopeo sent ns= to the mirror: %s", u)
		}
	}
	for _, q := range reg.AccessLog() {
		if strings.HasPrefix(q.UserAgent, "skopeo/") {
			t.Errorf("skopeo fell back to the registry: %+v", q)
		}
	}
}

func TestStartAgentAndSupernodeFake(t *testing.T) {
	t.Parallel()
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sn := harness.StartSupernode(t, bin)
	if p := sn.P2PAddrs(); len(p) != 1 || !strings.HasPrefix(p[0], "/ip4/127.0.0.1/tcp/") {
		t.Fatalf("supernode P2PAddrs = %v", p)
	}
	// The real supernode has no HTTP listener and rejects --listen.
	if slices.Contains(sn.Args(), "--listen") {
		t.Errorf("supernode args %v: StartSupernode must not add --listen", sn.Args())
	}

	dataDir := t.TempDir()
	ag := harness.StartAgent(t, bin, "--data-dir="+dataDir, "--supernode", sn.P2PAddrs()[0])
	if ag.DataDir() != dataDir {
		t.Errorf("DataDir = %q, want the one passed: %q", ag.DataDir(), dataDir)
	}
	if got := strings.Count(strings.Join(ag.Args(), " "), "data-dir"); got != 1 {
		t.Errorf("args %v: want exactly one --data-dir", ag.Args())
	}
	getOK(t, ag.MirrorURL()+"/v2/")

	first := ag.MirrorAddr()
	ag.Kill()
	select {
	case <-ag.Process().Exited():
	default:
		t.Fatal("Kill returned before the process exited")
	}
	ag.Restart(t)
	getOK(t, ag.MirrorURL()+"/v2/")
	t.Logf("mirror moved from %s to %s across the restart", first, ag.MirrorAddr())
	starts, err := os.ReadFile(filepath.Join(dataDir, "starts"))
	if err != nil || strings.Count(string(starts), "\n") != 2 {
		t.Errorf("data dir should have survived the restart: starts=%q err=%v", starts, err)
	}

	ag.Stop()
	if err := ag.Process().Err(); err != nil {
		t.Errorf("fake agent after SIGTERM: %v, want a clean exit", err)
	}
}

func TestStartAgentFailsWhenProcessExits(t *testing.T) {
	t.Parallel()
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{TB: t}
	rec.run(func() { harness.StartAgent(rec, bin, "--fail") })
	if !strings.Contains(rec.fatal, "exited") || !strings.Contains(rec.fatal, "fake failure") {
		t.Errorf("StartAgent on a dying process: fatal = %q; want it to say it exited, with the log tail", rec.fatal)
	}
}

func TestRequireTool(t *testing.T) {
	// Not parallel: t.Setenv.
	for _, ci := range []string{"true", ""} {
		t.Run("CI="+ci, func(t *testing.T) {
			t.Setenv("CI", ci)
			rec := &recorder{TB: t}
			rec.run(func() { harness.RequireTool(rec, "sh", "no-such-tool-e2e", "docker-registry") })
			msg := rec.fatal + rec.skip
			if (ci == "true") != (rec.fatal != "") || (ci == "true") == (rec.skip != "") {
				t.Errorf("CI=%q: fatal=%q skip=%q", ci, rec.fatal, rec.skip)
			}
			if !strings.Contains(msg, "no-such-tool-e2e") || !strings.Contains(msg, "apt-get install") {
				t.Errorf("message %q should name the tool and how to install it", msg)
			}
		})
	}
	rec := &recorder{TB: t}
	rec.run(func() { harness.RequireTool(rec, "sh") })
	if rec.fatal != "" || rec.skip != "" {
		t.Errorf("RequireTool(sh): fatal=%q skip=%q", rec.fatal, rec.skip)
	}
}

func TestProcessKillReachesGrandchildren(t *testing.T) {
	t.Parallel()
	p := harness.StartProcess(t, "shell", "sh", "-c", `sleep 600 & echo "child $!"; wait`)
	m := p.WaitForLog(t, regexp.MustCompile(`^child ([0-9]+)$`), 10*time.Second)
	child, err := strconv.Atoi(m[1])
	if err != nil {
		t.Fatal(err)
	}
	p.Kill()
	p.Kill() // idempotent
	// The orphaned sleep is killed with the group; it may linger as a
	// zombie if PID 1 of this container does not reap orphans.
	for {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(string(stat)); len(f) > 2 && (f[2] == "Z" || f[2] == "X") {
			break
		}
		select {
		case <-t.Context().Done():
			t.Fatal("grandchild still running")
		case <-time.After(10 * time.Millisecond): // poll interval
		}
	}
}

func TestModuleRoot(t *testing.T) {
	t.Parallel()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "e2e", "harness", "harness_test.go")); err != nil {
		t.Errorf("ModuleRoot = %s, which does not hold this package: %v", root, err)
	}
}

func TestWaitForFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "f")
	p := harness.StartProcess(t, "writer", "sh", "-c", `echo hello > "$1.tmp" && mv "$1.tmp" "$1"`, "sh", path)
	if got := string(harness.WaitForFile(t, path, 10*time.Second)); got != "hello\n" {
		t.Errorf("WaitForFile = %q", got)
	}
	if err := p.Wait(10 * time.Second); err != nil {
		t.Errorf("writer: %v", err)
	}
}

func TestWriteHostsToml(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := harness.WriteHostsToml(dir, "127.0.0.1:5000", "127.0.0.1:6000"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "127.0.0.1:5000", "hosts.toml"))
	if err != nil {
		t.Fatal(err)
	}
	want := "server = \"http://127.0.0.1:5000\"\n\n[host.\"http://127.0.0.1:6000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	if string(b) != want {
		t.Errorf("hosts.toml =\n%s\nwant\n%s", b, want)
	}

	// Without a mirror, an empty host table keeps containerd from
	// discarding the file.
	if err := harness.WriteHostsToml(dir, "127.0.0.1:5001", ""); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(filepath.Join(dir, "127.0.0.1:5001", "hosts.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "server = \"http://127.0.0.1:5001\"\n\n[host]\n"; string(b) != want {
		t.Errorf("hosts.toml =\n%s\nwant\n%s", b, want)
	}
}

func TestParseAccessLog(t *testing.T) {
	t.Parallel()
	// Lines as distribution 2.8.2 writes them (trimmed of unused fields),
	// plus noise the parser must skip.
	log := `{"level":"info","msg":"listening on 127.0.0.1:35907","time":"2026-11-23T10:56:48.558192882Z"}
{"http.request.method":"GET","http.request.remoteaddr":"127.0.0.1:35124","http.request.uri":"/v2/","http.request.useragent":"myagent","http.response.duration":"726.808µs","http.response.status":200,"http.response.written":2,"level":"info","msg":"response completed","time":"2026-11-23T10:56:56.600425596Z"}
127.0.0.1 - - [23/Nov/2026:10:56:56 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "myagent"
{"err.code":"blob unknown","http.request.method":"GET","http.request.remoteaddr":"127.0.0.1:35132","http.request.uri":"/v2/foo/blobs/sha256:00?ns=x","http.request.useragent":"curl/7.88.1","http.response.status":404,"http.response.written":157,"level":"error","msg":"response completed with error"}
{"http.request.method":"GET","http.request.remoteaddr":"127.0.0.1:46388","http.request.uri":"/v2/","http.request.useragent":"Go-http-client/1.1","level":"warning","msg":"error authorizing context: basic authentication challenge for realm \"starling-e2e\": invalid authorization credential","time":"2026-11-23T11:07:04.534237658Z"}
{"http.request.method":"HEAD","http.request.uri":"/v2/x/blobs/sha256:00","level":"info","msg":"authorized request"}
{"auth.user.name":"a","http.request.method":"HEAD","http.request.uri":"/v2/x/blobs/sha256:00","http.response.status":404,"http.response.written":157,"level":"error","msg":"response completed with error"}
{"http.request.method":"GET","http.resp`
	reqs, err := harness.ParseAccessLog([]byte(log))
	if err != nil {
		t.Fatal(err)
	}
	if len(reqs) != 4 {
		t.Fatalf("parsed %d requests, want 4:\n%s", len(reqs), harness.FormatRequests(reqs))
	}
	if q := reqs[0]; q.Method != "GET" || q.Path != "/v2/" || q.UserAgent != "myagent" || q.Status != 200 ||
		q.RemoteAddr != "127.0.0.1:35124" || q.Written != 2 || q.Duration != 726808*time.Nanosecond {
		t.Errorf("first request: %+v", q)
	}
	if q := reqs[1]; q.Status != 404 || q.URLPath() != "/v2/foo/blobs/sha256:00" || q.Digest() != "sha256:00" {
		t.Errorf("second request: %+v", q)
	}
	if q := reqs[2]; q.Status != http.StatusUnauthorized || q.Path != "/v2/" || q.RemoteAddr != "127.0.0.1:46388" {
		t.Errorf("third request (refused by auth): %+v", q)
	}
	if q := reqs[3]; q.Status != 404 || q.Method != http.MethodHead {
		t.Errorf("fourth request (authorized): %+v", q)
	}
}

// --- helpers ---

const mirrorUA = "harness-test-mirror"

// recordingMirror is a pass-through registry mirror that records what it is
// asked and identifies itself upstream with mirrorUA.
type recordingMirror struct {
	addr string
	mu   sync.Mutex
	seen []*url.URL
}

func startRecordingMirror(t *testing.T, upstream string) *recordingMirror {
	t.Helper()
	m := &recordingMirror{}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(&url.URL{Scheme: "http", Host: upstream})
			q := r.Out.URL.Query()
			q.Del("ns")
			r.Out.URL.RawQuery = q.Encode()
			r.Out.Host = upstream
			r.Out.Header.Set("User-Agent", mirrorUA)
		},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		m.seen = append(m.seen, r.URL)
		m.mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	m.addr = srv.Listener.Addr().String()
	return m
}

func (m *recordingMirror) requests() []*url.URL {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.seen)
}

func mustBlobDigests(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	ds, err := harness.BlobDigests(img)
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// assertContent checks that containerd's content store holds the manifest
// and every blob of img (each verified against its digest on commit).
func assertContent(t *testing.T, ctd *harness.Containerd, img v1.Image) {
	t.Helper()
	have, err := ctd.ContentDigests(t)
	if err != nil {
		t.Fatal(err)
	}
	want := append(mustBlobDigests(t, img), mustDigest(t, img))
	for _, d := range want {
		if !slices.Contains(have, d.String()) {
			t.Errorf("containerd content store lacks %s; has %v", d, have)
		}
	}
}

// assertDirLayout checks a skopeo dir: destination: one file per blob, named
// by the digest's hex, plus the manifest.
func assertDirLayout(t *testing.T, dir string, img v1.Image) {
	t.Helper()
	for _, d := range mustBlobDigests(t, img) {
		if _, err := os.Stat(filepath.Join(dir, d.Hex)); err != nil {
			t.Errorf("dir: copy lacks blob %s: %v", d, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err != nil {
		t.Errorf("dir: copy lacks manifest: %v", err)
	}
}

func getOK(t *testing.T, u string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
}

// recorder is a testing.TB whose Fatal and Skip record the message and end
// the goroutine, so that helpers' failure paths can be tested. Everything
// else goes to the real test.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Fatal(args ...any) { r.fatal = fmt.Sprint(args...); runtime.Goexit() }
func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skip = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run calls f in a goroutine (Goexit must not end the test goroutine) and
// waits for it.
func (r *recorder) run(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// fakeStarling implements just the process contract of `starling agent` and
// `starling supernode`: listen, write the address file atomically, count
// starts in the data dir, exit 0 on SIGTERM.
func fakeStarling(role string, args []string) int {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	addrFile := fs.String("addr-file", "", "")
	dataDir := fs.String("data-dir", "", "")
	listen := fs.String("listen", "127.0.0.1:0", "")
	fs.String("metrics-listen", "", "")
	fs.String("supernode", "", "")
	fail := fs.Bool("fail", false, "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *fail {
		fmt.Fprintln(os.Stderr, "fake failure")
		return 3
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	f, err := os.OpenFile(filepath.Join(*dataDir, "starts"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err == nil {
		_, err = f.WriteString("start\n")
		f.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	port := ln.Addr().(*net.TCPAddr).Port
	doc := fmt.Sprintf(`{"p2p":["/ip4/127.0.0.1/tcp/%d/p2p/12D3KooWFake"]}`, port)
	if role == "agent" {
		doc = fmt.Sprintf(`{"mirror":%q,"p2p":["/ip4/127.0.0.1/tcp/%d/p2p/12D3KooWFake"]}`, ln.Addr().String(), port)
	}
	tmp := *addrFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := os.Rename(tmp, *addrFile); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}
