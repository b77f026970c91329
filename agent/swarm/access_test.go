package swarm_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// gatePrivate (installed after the pushes) makes up answer private/*
// only to "Bearer good" and scopes digests to the repositories they were
// pushed to, as a real registry with a private project does.
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

func get(t *testing.T, url, authz string) int {
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
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// Invariant 6 through the swarm: once a private layer is in the swarm
// (an authorised client pulled it through agent A, so A and the seed hold
// it), an agent that never held it does not fetch it from peers for an
// anonymous client naming it under a public repository, and the
// supernode gives no piece table to a poll whose credentials upstream
// would refuse for that repository.
func TestPrivateBlobDoesNotLeakThroughTheSwarm(t *testing.T) {
	up := testregistry.New(t)
	priv := up.Push(t, "private/app:v1", 1, 1<<20)
	up.Push(t, "public/base:v1", 1, 4096)
	gatePrivate(up)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	a := startAgent(t, key, up.URL(), sn.Addrs(), nil)
	b := startAgent(t, key, up.URL(), sn.Addrs(), nil)
	layers, _ := priv.Layers()
	d, _ := layers[0].Digest()
	if got := get(t, a.srv.URL+"/v2/private/app/blobs/"+d.String(), "Bearer good"); got != http.StatusOK {
		t.Fatalf("authorised GET through agent A: %d", got)
	}
	if got := get(t, b.srv.URL+"/v2/public/base/manifests/v1", ""); got != http.StatusOK {
		t.Fatalf("anonymous GET of public/base through agent B: %d", got)
	}

	for _, path := range []string{"/v2/public/base/blobs/", "/v2/private/app/blobs/"} {
		if got := get(t, b.srv.URL+path+d.String(), ""); got == http.StatusOK {
			t.Errorf("anonymous GET %s<private layer> through agent B: 200", path)
		}
	}
	if s := b.agent.Stats(); s.FromPeers+s.FromSeed+s.FromUpstream != 0 {
		t.Errorf("agent B fetched %+v bytes of a blob its client may not read", s)
	}

	// An insider (it has the swarm key) polls for the blob itself.
	h, err := p2p.NewHost(p2p.Config{SwarmKeyFile: key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	snInfo, err := p2p.ParsePeerAddr(sn.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Connect(context.Background(), snInfo); err != nil {
		t.Fatal(err)
	}
	// Also a private blob nobody pulled yet: the refused poll must not
	// make the seed fetch it.
	fetches := sn.SeedFetches()
	cfgDigest, _ := priv.ConfigName()
	for _, c := range []struct{ repo, authz, digest string }{
		{"public/base", "", d.String()}, {"private/app", "", d.String()}, {"private/app", "Bearer other", d.String()},
		{"public/base", "", cfgDigest.String()}, {"private/app", "", cfgDigest.String()},
	} {
		s, err := h.NewStream(context.Background(), snInfo.ID, swarmproto.TrackerProtocol)
		if err != nil {
			t.Fatal(err)
		}
		if err := wire.WriteMsg(s, swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: c.digest, Registry: up.Host(),
			Repo: c.repo, Authorization: c.authz, Addrs: []string{h.Addrs()[0].String()}, Want: -1}); err != nil {
			t.Fatal(err)
		}
		var resp swarmproto.TrackerResponse
		if err := wire.ReadMsg(s, &resp, 1<<20); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if resp.Error == "" || len(resp.Pieces) > 0 || len(resp.Peers) > 0 || resp.Size >= 0 {
			t.Errorf("poll for %s in %s with authorization %q: error %q, %d pieces, %d peers, size %d; want a refusal",
				c.digest, c.repo, c.authz, resp.Error, len(resp.Pieces), len(resp.Peers), resp.Size)
		}
	}
	if got := sn.SeedFetches(); got != fetches {
		t.Errorf("refused polls started %d seed fetches", got-fetches)
	}
}
