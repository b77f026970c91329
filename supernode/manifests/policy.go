package manifests

import (
	"strings"
	"time"
)

// Policy is the manifest service's decisions without I/O: what it answers
// from its cache, which upstream request it sends, and which asker waits
// for another's. Time is an input and it never blocks, so the real
// Service (which does the HTTP and the waiting) and the simulator
// (e2e/simulate, which plays 10,000 agents under virtual time) run the
// same code. It is not safe for concurrent use; the Service holds its
// lock around every call.
//
// An asker's request is decided by Decide. A decision that leads a Flight
// is an upstream request the caller sends and reports back (Headed after
// a tag's HEAD, Resolved once a tag's manifest is known, Granted after a
// GET or HEAD by digest), then ends with End, which hands the outcome to
// the flight's waiters. A failure is reported to nobody: the waiters get
// the leader's error and each one may still be answered by Stale.
type Policy struct {
	tagTTL, authTTL time.Duration
	tags            map[string]tagEntry  // tagKey -> last resolution
	grants          map[string]time.Time // grantKey -> when upstream last said yes
	flights         map[string]*Flight
}

type tagEntry struct {
	digest string
	at     time.Time
}

// NewPolicy returns a Policy that reuses a tag's resolution for tagTTL
// (0: never) and upstream's yes to credentials for authTTL.
func NewPolicy(tagTTL, authTTL time.Duration) *Policy {
	return &Policy{tagTTL: max(tagTTL, 0), authTTL: max(authTTL, 0),
		tags: map[string]tagEntry{}, grants: map[string]time.Time{}, flights: map[string]*Flight{}}
}

// Request is one asker's question: a tag or a digest in a repository, for
// credentials named by Cred (CredKey of the Authorization header).
type Request struct {
	Registry, Repo, Ref, Cred string
}

// IsDigest tells a request by digest from one by tag.
func (r Request) IsDigest() bool { return strings.HasPrefix(r.Ref, "sha256:") }

// Action is what a Decision asks of the caller.
type Action int

const (
	// Cached: answer Digest's manifest from the cache.
	Cached Action = iota
	// Wait for Flight, led by another asker, and take its outcome.
	Wait
	// HeadTag: lead Flight; HEAD the tag upstream and report its digest
	// with Headed.
	HeadTag
	// Get: lead Flight; GET Ref upstream (a digest, or the tag when
	// upstream's HEAD named no usable digest), keep the manifest by its
	// digest, and report it with Resolved (a tag) or Granted (a digest).
	Get
	// HeadDigest: lead Flight; HEAD the digest upstream (are these
	// credentials allowed it?) and report a yes with Granted.
	HeadDigest
)

func (a Action) String() string {
	return [...]string{"cached", "wait", "head-tag", "get", "head-digest"}[a]
}

// Decision is the policy's answer to an asker.
type Decision struct {
	Action Action
	// Digest is the manifest to answer (Cached) or to fetch (Get of a
	// digest); empty for a Get of a tag.
	Digest string
	// Ref is what to ask upstream for (HeadTag, Get, HeadDigest).
	Ref    string
	Flight *Flight
}

// Flight is one upstream exchange that every concurrent asker of the same
// question shares.
type Flight struct {
	Key string
	// Data is the caller's: how waiters wait for the flight's outcome.
	Data any
}

// maxEntries bounds each map against clients cycling tokens or tags.
const maxEntries = 65536

func tagKey(reg, repo, tag, cred string) string {
	return reg + "/" + repo + ":" + tag + "#" + cred
}

func grantKey(reg, repo, digest, cred string) string {
	return reg + "/" + repo + "@" + digest + "#" + cred
}

// Decide answers a request at now: from the cache when the tag was
// resolved within the tag TTL (or the digest is here) and upstream
// accepted these credentials for it within the auth TTL; otherwise by
// joining the flight that already asks upstream, or leading a new one.
// cached reports whether the content-addressed cache holds a digest.
func (p *Policy) Decide(now time.Time, r Request, cached func(digest string) bool) Decision {
	if r.IsDigest() {
		gkey := grantKey(r.Registry, r.Repo, r.Ref, r.Cred)
		if !cached(r.Ref) {
			return p.flight("get\x00"+gkey, Decision{Action: Get, Digest: r.Ref, Ref: r.Ref})
		}
		if p.granted(now, gkey, p.authTTL) {
			return Decision{Action: Cached, Digest: r.Ref}
		}
		return p.flight("head\x00"+gkey, Decision{Action: HeadDigest, Digest: r.Ref, Ref: r.Ref})
	}
	key := tagKey(r.Registry, r.Repo, r.Ref, r.Cred)
	if e, ok := p.tags[key]; ok && p.tagTTL > 0 && now.Sub(e.at) < p.tagTTL &&
		p.granted(now, grantKey(r.Registry, r.Repo, e.digest, r.Cred), p.authTTL) && cached(e.digest) {
		return Decision{Action: Cached, Digest: e.digest}
	}
	return p.flight("tag\x00"+key, Decision{Action: HeadTag, Ref: r.Ref})
}

// flight joins the flight of key, or makes lead its leader's decision.
func (p *Policy) flight(key string, lead Decision) Decision {
	if f, ok := p.flights[key]; ok {
		return Decision{Action: Wait, Flight: f}
	}
	f := &Flight{Key: key}
	p.flights[key] = f
	lead.Flight = f
	return lead
}

// Headed takes upstream's answer to a tag's HEAD, digest ("" if it named
// none usable), and says how to get the manifest: Cached, a Get (one per
// digest and repository, whatever the credentials: upstream has just
// named the digest to these ones), or Wait for that Get. Once the
// manifest is here the caller reports it with Resolved.
func (p *Policy) Headed(now time.Time, r Request, digest string, cached func(digest string) bool) Decision {
	if digest == "" {
		// The tag's GET gives the body to hash; it is this flight's own.
		return Decision{Action: Get, Ref: r.Ref}
	}
	if cached(digest) {
		return Decision{Action: Cached, Digest: digest}
	}
	return p.flight("body\x00"+r.Registry+"/"+r.Repo+"@"+digest, Decision{Action: Get, Digest: digest, Ref: digest})
}

// Resolved records that upstream named digest for r's tag to r's
// credentials at now (and so accepted them for it).
func (p *Policy) Resolved(now time.Time, r Request, digest string) {
	p.putTag(tagKey(r.Registry, r.Repo, r.Ref, r.Cred), tagEntry{digest, now})
	p.Granted(now, r.Registry, r.Repo, digest, r.Cred)
}

// Granted records upstream's yes to cred for digest in repo at now.
func (p *Policy) Granted(now time.Time, registry, repo, digest, cred string) {
	p.putGrant(grantKey(registry, repo, digest, cred), now)
}

// End lands a flight: askers that come after it decide afresh.
func (p *Policy) End(f *Flight) {
	if p.flights[f.Key] == f {
		delete(p.flights, f.Key)
	}
}

// Stale is what r may be answered while upstream cannot be asked: a
// tag's last resolution, or a digest, that upstream gave these
// credentials at any time before and that is still cached.
func (p *Policy) Stale(r Request, cached func(digest string) bool) (string, bool) {
	digest := r.Ref
	if !r.IsDigest() {
		e, ok := p.tags[tagKey(r.Registry, r.Repo, r.Ref, r.Cred)]
		if !ok {
			return "", false
		}
		digest = e.digest
	}
	if !p.granted(time.Time{}, grantKey(r.Registry, r.Repo, digest, r.Cred), -1) || !cached(digest) {
		return "", false
	}
	return digest, true
}

// granted reports a yes younger than ttl; a negative ttl accepts any age
// (only while upstream cannot be asked).
func (p *Policy) granted(now time.Time, key string, ttl time.Duration) bool {
	t, ok := p.grants[key]
	return ok && (ttl < 0 || now.Sub(t) < ttl)
}

// putGrant and putTag sweep a full map of expired entries first, then
// clear it if that is not enough.
func (p *Policy) putGrant(key string, now time.Time) {
	if len(p.grants) >= maxEntries {
		for k, t := range p.grants {
			if now.Sub(t) >= p.authTTL {
				delete(p.grants, k)
			}
		}
		if len(p.grants) >= maxEntries {
			clear(p.grants)
		}
	}
	p.grants[key] = now
}

func (p *Policy) putTag(key string, e tagEntry) {
	if len(p.tags) >= maxEntries {
		for k, old := range p.tags {
			if e.at.Sub(old.at) >= p.tagTTL {
				delete(p.tags, k)
			}
		}
		if len(p.tags) >= maxEntries {
			clear(p.tags)
		}
	}
	p.tags[key] = e
}
