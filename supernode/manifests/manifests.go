// Package manifests is the supernode's manifest service: agents resolve
// tags and fetch manifests through the supernode that owns an image, so the
// registry sees one request per image and tag TTL, not one per node.
//
// A manifest is fetched by digest once and kept (it is content addressed).
// A tag is resolved upstream at most once per TagTTL for each set of
// credentials, with a HEAD (registries such as Docker Hub do not count
// HEADs against pull rate limits), and concurrent resolutions share one
// upstream request that runs detached from any one asker. An answer is
// only given to credentials upstream has accepted for that digest in that
// repository: the client's own, checked with a HEAD when no recent answer
// for them is on record, or, for a client that sent none, the supernode's
// (its keychain, else anonymous), which is what the agent would have used.
package manifests

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
)

// Accept is what the service asks upstream for: every manifest type, so a
// tag resolves to what it names (an index for a multi-platform image).
var Accept = []string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// Cache keeps manifests by digest and the last digest of each tag
// (pkg/store.Store is one).
type Cache interface {
	PutManifest(digest string, m store.Manifest) error
	Manifest(digest string) (store.Manifest, error)
	PutTag(registry, repo, tag, digest string) error
	Tag(registry, repo, tag string) (string, error)
}

// Config tunes a Service.
type Config struct {
	// TagTTL is how long a tag's resolution is reused; 0 sends every
	// resolution upstream (concurrent ones still share one request).
	TagTTL time.Duration
	// AuthTTL is how long upstream's yes to (registry, repository, digest,
	// credentials) is reused before those credentials are checked again.
	AuthTTL time.Duration
	// Timeout bounds one shared upstream exchange; it does not depend on
	// any one asker staying.
	Timeout time.Duration
	Now     func() time.Time
	// OnGrant, when set, hears of each manifest upstream has just given
	// to credentials in a repository (the supernode's access checker
	// records it and the blobs it names, so seeding them needs no HEAD).
	OnGrant func(registry, repo, digest, authorization string, body []byte)
}

// Service answers manifest requests.
type Service struct {
	cfg   Config
	regs  *upstream.Set
	up    *upstream.Client
	cache Cache
	log   *zap.Logger

	flights singleflight.Group
	// onWait, when set (tests), is called as a caller starts waiting on a
	// shared upstream exchange.
	onWait func()
	// onBody, when set (tests), is called as a tag's resolution starts to
	// get the manifest it names.
	onBody func()

	upstreamGETs, upstreamHEADs, staleAnswers atomic.Int64

	mu     sync.Mutex
	tags   map[string]tagEntry  // tagKey -> last resolution
	grants map[string]time.Time // grantKey -> when upstream last said yes
}

type tagEntry struct {
	digest string
	at     time.Time
}

// maxEntries bounds each map against clients cycling tokens or tags.
const maxEntries = 65536

// New builds a Service.
func New(cfg Config, regs *upstream.Set, up *upstream.Client, cache Cache, log *zap.Logger) *Service {
	if cfg.TagTTL < 0 {
		cfg.TagTTL = 0
	}
	if cfg.AuthTTL < 0 {
		cfg.AuthTTL = 0
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg, regs: regs, up: up, cache: cache, log: log,
		tags: map[string]tagEntry{}, grants: map[string]time.Time{}}
}

// Stats are the service's counters.
type Stats struct {
	// UpstreamGETs and UpstreamHEADs are the manifest requests sent
	// upstream; registries such as Docker Hub count the GETs as pulls.
	UpstreamGETs, UpstreamHEADs int64
	// StaleAnswers were given while upstream was unavailable.
	StaleAnswers int64
}

// Stats returns the service's counters.
func (s *Service) Stats() Stats {
	return Stats{UpstreamGETs: s.upstreamGETs.Load(), UpstreamHEADs: s.upstreamHEADs.Load(), StaleAnswers: s.staleAnswers.Load()}
}

// Answer is a manifest and its digest.
type Answer struct {
	Digest   string
	Manifest store.Manifest
	// Stale: upstream was unavailable and this is the tag's last known digest.
	Stale bool
}

// credKey names credentials without keeping them: "" for none.
func credKey(authorization string) string {
	if authorization == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(authorization))
	return hex.EncodeToString(sum[:16])
}

func tagKey(reg, repo, tag, cred string) string {
	return reg + "/" + repo + ":" + tag + "#" + cred
}

func grantKey(reg, repo, digest, cred string) string {
	return reg + "/" + repo + "@" + digest + "#" + cred
}

// Resolve answers req: the manifest its tag names now (within TagTTL), or
// the manifest with its digest, for req's credentials.
func (s *Service) Resolve(ctx context.Context, req *swarmproto.ManifestRequest) (*Answer, error) {
	reg, ok := s.regs.Lookup(req.Registry)
	if !ok || reg.Host != req.Registry {
		return nil, ocierr.New(http.StatusForbidden, ocierr.Denied, "registry %q is not mirrored by this supernode", req.Registry)
	}
	if req.IsDigest() {
		return s.byDigest(ctx, reg, req.Repo, req.Ref, req.Authorization)
	}
	return s.byTag(ctx, reg, req.Repo, req.Ref, req.Authorization)
}

func (s *Service) byTag(ctx context.Context, reg upstream.Registry, repo, tag, authz string) (*Answer, error) {
	cred := credKey(authz)
	key := tagKey(reg.Host, repo, tag, cred)
	if ans := s.freshTag(reg, repo, key, cred); ans != nil {
		return ans, nil
	}
	ans, err := s.shared(ctx, "tag\x00"+key, func(ctx context.Context) (*Answer, error) {
		// A flight that ended since the check above may have resolved it.
		if ans := s.freshTag(reg, repo, key, cred); ans != nil {
			return ans, nil
		}
		return s.resolveTag(ctx, reg, repo, tag, authz)
	})
	if err != nil && upstream.IsUnavailable(err) {
		if stale := s.staleTag(reg, repo, tag, cred); stale != nil {
			s.staleAnswers.Add(1)
			s.log.Warn("upstream unavailable: answering the tag's last resolution", zap.String("registry", reg.Host),
				zap.String("repo", repo), zap.String("tag", tag), zap.String("digest", stale.Digest), zap.Error(err))
			return stale, nil
		}
	}
	return ans, err
}

// freshTag answers a tag from its resolution within TagTTL, for
// credentials upstream accepted within AuthTTL; nil if there is none.
func (s *Service) freshTag(reg upstream.Registry, repo, key, cred string) *Answer {
	if s.cfg.TagTTL <= 0 {
		return nil
	}
	s.mu.Lock()
	e, ok := s.tags[key]
	s.mu.Unlock()
	if !ok || s.cfg.Now().Sub(e.at) >= s.cfg.TagTTL || !s.granted(grantKey(reg.Host, repo, e.digest, cred), s.cfg.AuthTTL) {
		return nil
	}
	m, err := s.cache.Manifest(e.digest)
	if err != nil {
		return nil
	}
	return &Answer{Digest: e.digest, Manifest: m}
}

// shared runs fn once for all concurrent callers with the same key, on a
// context of its own: an asker that goes away does not cancel it for the
// others. Each caller still stops waiting when its own ctx ends.
func (s *Service) shared(ctx context.Context, key string, fn func(context.Context) (*Answer, error)) (*Answer, error) {
	ch := s.flights.DoChan(key, func() (any, error) {
		fctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
		defer cancel()
		return fn(fctx)
	})
	if s.onWait != nil {
		s.onWait()
	}
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*Answer), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for upstream manifest answer: %w", ctx.Err())
	}
}

// resolveTag asks upstream what the tag names now, with a HEAD, and gets
// the manifest by digest unless it is already here.
func (s *Service) resolveTag(ctx context.Context, reg upstream.Registry, repo, tag, authz string) (*Answer, error) {
	cred := credKey(authz)
	s.upstreamHEADs.Add(1)
	resp, err := s.up.Do(ctx, upstream.Request{
		Registry: reg, Repo: repo, Method: http.MethodHead, Path: "manifests/" + tag,
		Authorization: authz, Header: acceptHeader(),
	})
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	digest := resp.Header.Get("Docker-Content-Digest")
	var ans *Answer
	if swarmprotoDigest(digest) {
		if m, err := s.cache.Manifest(digest); err == nil {
			ans = &Answer{Digest: digest, Manifest: m}
		} else {
			// Upstream just named this digest in this repository to these
			// credentials: the body may come from a GET made for other
			// credentials' resolution of it, so there is one GET per digest.
			if s.onBody != nil {
				s.onBody()
			}
			v, err, _ := s.flights.Do("body\x00"+reg.Host+"/"+repo+"@"+digest, func() (any, error) {
				if m, err := s.cache.Manifest(digest); err == nil { // kept by a flight that just ended
					return &Answer{Digest: digest, Manifest: m}, nil
				}
				return s.fetch(ctx, reg, repo, digest, authz)
			})
			if err != nil {
				return nil, err
			}
			ans = v.(*Answer)
		}
	} else if ans, err = s.fetch(ctx, reg, repo, tag, authz); err != nil {
		// Upstream sent no usable digest: the tag's GET gives the body to hash.
		return nil, err
	}
	now := s.cfg.Now()
	s.mu.Lock()
	s.putTag(tagKey(reg.Host, repo, tag, cred), tagEntry{ans.Digest, now})
	s.putGrant(grantKey(reg.Host, repo, ans.Digest, cred), now)
	s.mu.Unlock()
	s.onGrant(reg, repo, ans, authz)
	if err := s.cache.PutTag(reg.Host, repo, tag, ans.Digest); err != nil {
		s.log.Warn("remember tag", zap.String("tag", tag), zap.Error(err))
	}
	return ans, nil
}

// fetch GETs a manifest (by digest, or by tag when upstream named no
// digest), checks it and keeps it by digest.
func (s *Service) fetch(ctx context.Context, reg upstream.Registry, repo, ref, authz string) (*Answer, error) {
	s.upstreamGETs.Add(1)
	resp, err := s.up.Do(ctx, upstream.Request{
		Registry: reg, Repo: repo, Method: http.MethodGet, Path: "manifests/" + ref,
		Authorization: authz, Header: acceptHeader(),
	})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, swarmproto.MaxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read manifest %s from upstream: %w", ref, err)
	}
	if len(body) > swarmproto.MaxManifestBytes {
		return nil, ocierr.New(http.StatusBadGateway, ocierr.ManifestInvalid, "upstream manifest exceeds %d bytes", swarmproto.MaxManifestBytes)
	}
	sum := sha256.Sum256(body)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if swarmprotoDigest(ref) && digest != ref {
		return nil, ocierr.New(http.StatusBadGateway, ocierr.ManifestInvalid, "upstream manifest hashes to %s, not %s", digest, ref)
	}
	m := store.Manifest{MediaType: resp.Header.Get("Content-Type"), Body: body}
	if err := s.cache.PutManifest(digest, m); err != nil {
		s.log.Warn("cache manifest", zap.String("digest", digest), zap.Error(err))
	}
	return &Answer{Digest: digest, Manifest: m}, nil
}

// byDigest answers a manifest from the cache to credentials upstream has
// accepted for it in this repository, asking upstream with a HEAD when no
// recent yes is on record, and fetches it once when it is not here.
func (s *Service) byDigest(ctx context.Context, reg upstream.Registry, repo, digest, authz string) (*Answer, error) {
	cred := credKey(authz)
	gkey := grantKey(reg.Host, repo, digest, cred)
	m, cerr := s.cache.Manifest(digest)
	if cerr != nil {
		ans, err := s.shared(ctx, "get\x00"+gkey, func(ctx context.Context) (*Answer, error) {
			// A flight that ended since the check above may have fetched it.
			if m, err := s.cache.Manifest(digest); err == nil && s.granted(gkey, s.cfg.AuthTTL) {
				return &Answer{Digest: digest, Manifest: m}, nil
			}
			ans, err := s.fetch(ctx, reg, repo, digest, authz)
			if err == nil {
				s.grant(gkey)
				s.onGrant(reg, repo, ans, authz)
			}
			return ans, err
		})
		return ans, err
	}
	if s.granted(gkey, s.cfg.AuthTTL) {
		return &Answer{Digest: digest, Manifest: m}, nil
	}
	_, err := s.shared(ctx, "head\x00"+gkey, func(ctx context.Context) (*Answer, error) {
		s.upstreamHEADs.Add(1)
		resp, err := s.up.Do(ctx, upstream.Request{
			Registry: reg, Repo: repo, Method: http.MethodHead, Path: "manifests/" + digest,
			Authorization: authz, Header: acceptHeader(),
		})
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		s.grant(gkey)
		s.onGrant(reg, repo, &Answer{Digest: digest, Manifest: m}, authz)
		return &Answer{Digest: digest}, nil
	})
	if err != nil {
		if upstream.IsUnavailable(err) && s.granted(gkey, -1) {
			s.staleAnswers.Add(1)
			s.log.Warn("upstream unavailable: answering a manifest these credentials were given before",
				zap.String("registry", reg.Host), zap.String("repo", repo), zap.String("digest", digest), zap.Error(err))
			return &Answer{Digest: digest, Manifest: m}, nil
		}
		return nil, err
	}
	return &Answer{Digest: digest, Manifest: m}, nil
}

// staleTag is the tag's last resolution for these credentials, while
// upstream cannot be asked.
func (s *Service) staleTag(reg upstream.Registry, repo, tag, cred string) *Answer {
	s.mu.Lock()
	e, ok := s.tags[tagKey(reg.Host, repo, tag, cred)]
	s.mu.Unlock()
	if !ok || !s.granted(grantKey(reg.Host, repo, e.digest, cred), -1) {
		return nil
	}
	m, err := s.cache.Manifest(e.digest)
	if err != nil {
		return nil
	}
	return &Answer{Digest: e.digest, Manifest: m, Stale: true}
}

func (s *Service) onGrant(reg upstream.Registry, repo string, ans *Answer, authz string) {
	if s.cfg.OnGrant != nil {
		s.cfg.OnGrant(reg.Host, repo, ans.Digest, authz, ans.Manifest.Body)
	}
}

func (s *Service) grant(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putGrant(key, s.cfg.Now())
}

// granted reports a yes younger than ttl; a negative ttl accepts any age
// (only while upstream cannot be asked).
func (s *Service) granted(key string, ttl time.Duration) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.grants[key]
	return ok && (ttl < 0 || s.cfg.Now().Sub(t) < ttl)
}

// putGrant and putTag are called with s.mu held; a full map is swept of
// expired entries first, then cleared if that is not enough.
func (s *Service) putGrant(key string, now time.Time) {
	if len(s.grants) >= maxEntries {
		for k, t := range s.grants {
			if now.Sub(t) >= s.cfg.AuthTTL {
				delete(s.grants, k)
			}
		}
		if len(s.grants) >= maxEntries {
			clear(s.grants)
		}
	}
	s.grants[key] = now
}

func (s *Service) putTag(key string, e tagEntry) {
	if len(s.tags) >= maxEntries {
		for k, old := range s.tags {
			if e.at.Sub(old.at) >= s.cfg.TagTTL {
				delete(s.tags, k)
			}
		}
		if len(s.tags) >= maxEntries {
			clear(s.tags)
		}
	}
	s.tags[key] = e
}

func acceptHeader() http.Header {
	return http.Header{"Accept": {strings.Join(Accept, ", ")}}
}

func swarmprotoDigest(s string) bool {
	r := swarmproto.ManifestRequest{Ref: s}
	return r.IsDigest() && len(s) == len("sha256:")+64 && strings.Trim(s[len("sha256:"):], "0123456789abcdef") == ""
}

// errorStatus is the HTTP status to report for err: upstream's when it
// answered, 0 when it could not be reached.
func errorStatus(err error) int {
	var oe *ocierr.Error
	if errors.As(err, &oe) {
		if oe.Status < 400 || oe.Status > 599 {
			return http.StatusBadGateway
		}
		return oe.Status
	}
	return 0
}
