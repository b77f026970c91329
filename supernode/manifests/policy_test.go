package manifests

import (
	"testing"
	"time"
)

// The policy alone, under a hand-moved clock: what the Service and the
// simulator (e2e/simulate) both run.

const (
	dA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	dB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

type set map[string]bool

func (c set) has(d string) bool { return c[d] }

// Many askers of one tag: one HEAD, one GET, everyone else waits; after
// the flight they are answered from the cache until the TTL runs out.
func TestPolicyCoalescesAndReusesWithinTTL(t *testing.T) {
	p := NewPolicy(time.Second, 5*time.Minute)
	cache := set{}
	t0 := time.Unix(1_700_000_000, 0)
	r := Request{Registry: "reg", Repo: "app", Ref: "latest"}

	lead := p.Decide(t0, r, cache.has)
	if lead.Action != HeadTag || lead.Flight == nil {
		t.Fatalf("first asker: %+v, want to lead a HEAD of the tag", lead)
	}
	for range 1000 {
		if d := p.Decide(t0, r, cache.has); d.Action != Wait || d.Flight != lead.Flight {
			t.Fatalf("concurrent asker: %+v, want to wait on the leader's flight", d)
		}
	}
	body := p.Headed(t0, r, dA, cache.has)
	if body.Action != Get || body.Digest != dA || body.Flight == nil {
		t.Fatalf("after the HEAD: %+v, want a GET of %s", body, dA)
	}
	cache[dA] = true
	p.End(body.Flight)
	p.Resolved(t0, r, dA)
	p.End(lead.Flight)

	if d := p.Decide(t0.Add(999*time.Millisecond), r, cache.has); d.Action != Cached || d.Digest != dA {
		t.Fatalf("within the TTL: %+v, want %s from the cache", d, dA)
	}
	if d := p.Decide(t0.Add(time.Second), r, cache.has); d.Action != HeadTag {
		t.Fatalf("at the TTL: %+v, want a new HEAD", d)
	}
}

// A tag that moved is answered with its new digest once the TTL is over.
func TestPolicyMovedTagAfterTTL(t *testing.T) {
	p := NewPolicy(time.Second, 5*time.Minute)
	cache := set{dA: true}
	t0 := time.Unix(1_700_000_000, 0)
	r := Request{Registry: "reg", Repo: "app", Ref: "latest"}
	d := p.Decide(t0, r, cache.has)
	if h := p.Headed(t0, r, dA, cache.has); h.Action != Cached {
		t.Fatalf("cached manifest: %+v", h)
	}
	p.Resolved(t0, r, dA)
	p.End(d.Flight)

	t1 := t0.Add(time.Second)
	d = p.Decide(t1, r, cache.has)
	h := p.Headed(t1, r, dB, cache.has) // upstream now names dB
	if h.Action != Get || h.Digest != dB {
		t.Fatalf("moved tag: %+v, want a GET of the new digest", h)
	}
	cache[dB] = true
	p.End(h.Flight)
	p.Resolved(t1, r, dB)
	p.End(d.Flight)
	if d := p.Decide(t1, r, cache.has); d.Action != Cached || d.Digest != dB {
		t.Fatalf("after the move: %+v, want %s", d, dB)
	}
}

// Other credentials never get a cached answer they were not given by
// upstream: their tag is their own HEAD, a digest a HEAD of it. The
// manifest's GET is shared (one per digest and repository).
func TestPolicyCredentialsAreAskedUpstream(t *testing.T) {
	p := NewPolicy(time.Hour, 5*time.Minute)
	cache := set{}
	t0 := time.Unix(1_700_000_000, 0)
	alice := Request{Registry: "reg", Repo: "private", Ref: "v1", Cred: CredKey("Bearer alice")}
	bob := alice
	bob.Cred = CredKey("Bearer bob")

	la, lb := p.Decide(t0, alice, cache.has), p.Decide(t0, bob, cache.has)
	if la.Action != HeadTag || lb.Action != HeadTag || la.Flight == lb.Flight {
		t.Fatalf("two credentials: %+v, %+v; want a HEAD each", la, lb)
	}
	ga, gb := p.Headed(t0, alice, dA, cache.has), p.Headed(t0, bob, dA, cache.has)
	if ga.Action != Get || gb.Action != Wait || gb.Flight != ga.Flight {
		t.Fatalf("after both HEADs: %+v, %+v; want one GET and a wait on it", ga, gb)
	}
	cache[dA] = true
	p.End(ga.Flight)
	p.Resolved(t0, alice, dA)
	p.End(la.Flight)

	anon := Request{Registry: "reg", Repo: "private", Ref: dA}
	if d := p.Decide(t0, anon, cache.has); d.Action != HeadDigest {
		t.Fatalf("anonymous by digest of a cached private manifest: %+v, want a HEAD upstream", d)
	}
	if d := p.Decide(t0, Request{Registry: "reg", Repo: "other", Ref: dA, Cred: alice.Cred}, cache.has); d.Action != HeadDigest {
		t.Fatalf("alice's digest in another repository: %+v, want a HEAD upstream", d)
	}
	if d := p.Decide(t0.Add(time.Minute), Request{Registry: "reg", Repo: "private", Ref: dA, Cred: alice.Cred}, cache.has); d.Action != Cached {
		t.Fatalf("alice by digest within the auth TTL: %+v, want the cache", d)
	}
	if d := p.Decide(t0.Add(5*time.Minute), alice, cache.has); d.Action != HeadTag {
		t.Fatalf("alice's tag after the auth TTL: %+v, want a HEAD (her yes is old)", d)
	}
}

// While upstream is down, the last resolution is there for the
// credentials that were given it, for nobody else.
func TestPolicyStale(t *testing.T) {
	p := NewPolicy(time.Second, time.Minute)
	cache := set{dA: true}
	t0 := time.Unix(1_700_000_000, 0)
	r := Request{Registry: "reg", Repo: "app", Ref: "v1"}
	if _, ok := p.Stale(r, cache.has); ok {
		t.Fatal("stale answer for a tag never resolved")
	}
	p.Resolved(t0, r, dA)
	if d, ok := p.Stale(r, cache.has); !ok || d != dA {
		t.Fatalf("Stale = %s, %v; want %s", d, ok, dA)
	}
	other := r
	other.Cred = CredKey("Bearer eve")
	if _, ok := p.Stale(other, cache.has); ok {
		t.Fatal("stale answer to credentials upstream never accepted")
	}
	if _, ok := p.Stale(r, set{}.has); ok {
		t.Fatal("stale answer for a manifest no longer cached")
	}
}

// With no TTL every resolution goes upstream, but concurrent ones still
// share one request.
func TestPolicyZeroTTL(t *testing.T) {
	p := NewPolicy(0, time.Minute)
	cache := set{dA: true}
	t0 := time.Unix(1_700_000_000, 0)
	r := Request{Registry: "reg", Repo: "app", Ref: "v1"}
	d := p.Decide(t0, r, cache.has)
	if w := p.Decide(t0, r, cache.has); w.Action != Wait {
		t.Fatalf("concurrent: %+v", w)
	}
	p.Resolved(t0, r, dA)
	p.End(d.Flight)
	if d := p.Decide(t0, r, cache.has); d.Action != HeadTag {
		t.Fatalf("TTL 0: %+v, want a HEAD", d)
	}
}
