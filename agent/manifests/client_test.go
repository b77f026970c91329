package manifests_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/supernode"
)

// Agents and a supernode run in process on loopback libp2p hosts with a
// private swarm key, in front of go-containerregistry's registry.

func swarmKey(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "swarm.key")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := p2p.GenerateSwarmKey(f); err != nil {
		t.Fatal(err)
	}
	return path
}

func startSupernode(t testing.TB, key, registry string, tagTTL time.Duration) *supernode.Supernode {
	t.Helper()
	cfg := supernode.DefaultConfig()
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.SwarmKey = key
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{registry}}
	cfg.TagTTL = config.Duration(tagTTL)
	sn, err := supernode.New(cfg, zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)).Named("supernode"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return sn
}

func startAgent(t testing.TB, key, registry string, supernodes []string) *httptest.Server {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{registry}}
	cfg.Supernodes = config.Strings{Values: supernodes}
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.SwarmKey = key
	cfg.StallTimeout = config.Duration(30 * time.Second)
	a, err := agent.New(cfg, zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)).Named("agent"))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		a.Close()
	})
	return srv
}

// pull fetches the image by tag through a mirror, as a runtime would, and
// returns the manifest digest it got.
func pull(mirror, repoTag string) (string, error) {
	ref, err := name.ParseReference(strings.TrimPrefix(mirror, "http://")+"/"+repoTag, name.Insecure)
	if err != nil {
		return "", err
	}
	img, err := remote.Image(ref)
	if err != nil {
		return "", fmt.Errorf("pull %s: %w", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return "", err
	}
	for _, l := range layers {
		rc, err := l.Compressed() // checks the digest as it reads
		if err != nil {
			return "", err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return "", err
		}
	}
	d, err := img.Digest()
	return d.String(), err
}

func digestOf(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

func pullAll(t *testing.T, mirrors []*httptest.Server, repoTag, want string) {
	t.Helper()
	var wg sync.WaitGroup
	for i, m := range mirrors {
		wg.Go(func() {
			got, err := pull(m.URL, repoTag)
			if err != nil {
				t.Errorf("agent %d: %v", i, err)
			} else if got != want {
				t.Errorf("agent %d got %s, want %s", i, got, want)
			}
		})
	}
	wg.Wait()
}

// Four agents pulling one tag at once make the registry see one manifest
// HEAD (the tag) and one manifest GET (the digest), not one GET per agent.
func TestAgentsResolveTagsThroughTheSupernode(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "team/app:v1", 2, 64<<10)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), time.Hour)
	var mirrors []*httptest.Server
	for range 4 {
		mirrors = append(mirrors, startAgent(t, key, up.URL(), sn.Addrs()))
	}
	pullAll(t, mirrors, "team/app:v1", digestOf(t, img))
	if g, h := up.Count("GET manifests"), up.Count("HEAD manifests"); g != 1 || h != 1 {
		t.Fatalf("registry saw %d manifest GETs and %d HEADs for 4 agents, want 1 and 1", g, h)
	}
	// The manifest upstream gave these (empty) credentials names the
	// blobs: the supernode needs no HEAD per blob before seeding them.
	if h := up.Count("HEAD blobs"); h != 0 {
		t.Fatalf("registry saw %d blob HEADs, want 0", h)
	}
}

// With a tag TTL of 0 the agents keep no tag of their own: a tag moved
// upstream is what the very next pull through any agent gets.
func TestMovedTagSeenByEveryAgentAtOnceWithZeroTTL(t *testing.T) {
	up := testregistry.New(t)
	up.Push(t, "team/app:latest", 1, 16<<10)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	mirrors := []*httptest.Server{startAgent(t, key, up.URL(), sn.Addrs()), startAgent(t, key, up.URL(), sn.Addrs())}
	for _, m := range mirrors {
		if _, err := pull(m.URL, "team/app:latest"); err != nil {
			t.Fatal(err)
		}
	}
	moved := up.Push(t, "team/app:latest", 1, 32<<10)
	pullAll(t, mirrors, "team/app:latest", digestOf(t, moved))
}

// With the supernode gone, agents resolve tags upstream themselves: the
// pull still works.
func TestAgentFallsBackToUpstreamWithSupernodeDown(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "team/app:v1", 1, 16<<10)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), time.Hour)
	addrs := sn.Addrs()
	m := startAgent(t, key, up.URL(), addrs)
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := pull(m.URL, "team/app:v1")
	if err != nil || got != digestOf(t, img) {
		t.Fatalf("pull with the supernode down: %s, %v", got, err)
	}
	if g := up.Count("GET manifests"); g != 1 {
		t.Fatalf("registry saw %d manifest GETs, want the agent's own 1", g)
	}
}

func get(t *testing.T, url, authz string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// A private repository resolved through the supernode for one client is
// not answered to a client upstream has not accepted, on that agent or
// another; the refused client gets upstream's challenge.
func TestPrivateRepositoryNotServedToUnacceptedClients(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "private/app:v1", 1, 16<<10)
	up.RequireToken("secret")
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), time.Hour)
	a := startAgent(t, key, up.URL(), sn.Addrs())
	b := startAgent(t, key, up.URL(), sn.Addrs())
	digest := digestOf(t, img)

	if resp := get(t, a.URL+"/v2/private/app/manifests/v1", "Bearer secret"); resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != digest {
		t.Fatalf("accepted client: %d %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	}
	for _, m := range []*httptest.Server{a, b} {
		for _, ref := range []string{"v1", digest} {
			for _, authz := range []string{"", "Bearer wrong"} {
				resp := get(t, m.URL+"/v2/private/app/manifests/"+ref, authz)
				if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != testregistry.Challenge {
					t.Fatalf("%s with %q: %d, challenge %q; want 401 with upstream's challenge",
						ref, authz, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
				}
			}
		}
	}
	// The accepted credentials get it on the other agent too.
	if resp := get(t, b.URL+"/v2/private/app/manifests/"+digest, "Bearer secret"); resp.StatusCode != 200 {
		t.Fatalf("accepted client on agent b: %d", resp.StatusCode)
	}
}

// dockerHubLike puts a Docker Hub style token gate in front of up: every
// request needs a bearer token from the token endpoint (served at /token
// by the registry's own host, as a realm must be for a loopback registry);
// anonymous tokens read repositories under public/, a token got with
// credentials reads everything.
func dockerHubLike(t *testing.T, up *testregistry.Registry) {
	t.Helper()
	challenge := `Bearer realm="` + up.URL() + `/token",service="test"`
	up.SetGate(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/token" {
			tok := "anon"
			if r.Header.Get("Authorization") != "" {
				tok = "private-ok"
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"token":"`+tok+`"}`)
			return true
		}
		authz := r.Header.Get("Authorization")
		public := strings.HasPrefix(r.URL.Path, "/v2/public/")
		if authz == "Bearer private-ok" || (authz == "Bearer anon" && public) {
			return false
		}
		w.Header().Set("WWW-Authenticate", challenge)
		w.WriteHeader(http.StatusUnauthorized)
		return true
	})
}

// Against a registry that wants a token even for public repositories
// (Docker Hub), anonymous pulls of a public image need no request per
// node: the supernode takes an anonymous token itself and the agents
// answer their clients without sending them through the token flow.
func TestAnonymousPublicPullsNeedNoPerNodeRequest(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "public/app:v1", 1, 16<<10)
	up.Push(t, "private/app:v1", 1, 16<<10)
	dockerHubLike(t, up)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), time.Hour)
	var mirrors []*httptest.Server
	for range 3 {
		mirrors = append(mirrors, startAgent(t, key, up.URL(), sn.Addrs()))
	}
	for i, m := range mirrors {
		resp := get(t, m.URL+"/v2/public/app/manifests/v1", "")
		if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != digestOf(t, img) {
			t.Fatalf("agent %d: anonymous GET of a public tag: %d %s", i, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
		}
	}
	if g, h := up.Count("GET manifests"), up.Count("HEAD manifests"); g != 1 || h != 1 {
		t.Fatalf("registry saw %d manifest GETs and %d HEADs for 3 agents, want 1 and 1", g, h)
	}
	// A private repository still sends the anonymous client to the token flow.
	resp := get(t, mirrors[0].URL+"/v2/private/app/manifests/v1", "")
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer realm=") {
		t.Fatalf("anonymous GET of a private tag: %d %q, want 401 with the challenge", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}
