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

// Service answers manifest requests: the Policy decides, the Service
// talks to upstream and makes askers wait.
type Service struct {
	cfg   Config
	regs  *upstream.Set
	up    *upstream.Client
	cache Cache
	log   *zap.Logger

	// onWait, when set (tests), is called as a caller starts waiting on a
	// shared upstream exchange.
	onWait func()
	// onBody, when set (tests), is called as a tag's resolution starts to
	// get the manifest it names.
	onBody func()

	upstreamGETs, upstreamHEADs, staleAnswers atomic.Int64

	mu  sync.Mutex // guards pol
	pol *Policy
}

// call is a flight's outcome, for its waiters (Flight.Data).
type call struct {
	done chan struct{}
	ans  *Answer
	err  error
}

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
	return &Service{cfg: cfg, regs: regs, up: up, cache: cache, log: log, pol: NewPolicy(cfg.TagTTL, cfg.AuthTTL)}
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

// CredKey names credentials without keeping them: "" for none.
func CredKey(authorization string) string {
	if authorization == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(authorization))
	return hex.EncodeToString(sum[:16])
}

// loader is the cache as the Policy sees it: cached reads a manifest and
// keeps it, so an answer from the cache reads it once.
type loader struct {
	cache Cache
	got   map[string]store.Manifest
}

func (l *loader) cached(digest string) bool {
	if _, ok := l.got[digest]; ok {
		return true
	}
	m, err := l.cache.Manifest(digest)
	if err != nil {
		return false
	}
	if l.got == nil {
		l.got = map[string]store.Manifest{}
	}
	l.got[digest] = m
	return true
}

// Resolve answers req: the manifest its tag names now (within TagTTL), or
// the manifest with its digest, for req's credentials.
func (s *Service) Resolve(ctx context.Context, req *swarmproto.ManifestRequest) (*Answer, error) {
	reg, ok := s.regs.Lookup(req.Registry)
	if !ok || reg.Host != req.Registry {
		return nil, ocierr.New(http.StatusForbidden, ocierr.Denied, "registry %q is not mirrored by this supernode", req.Registry)
	}
	r := Request{Registry: reg.Host, Repo: req.Repo, Ref: req.Ref, Cred: CredKey(req.Authorization)}
	ld := &loader{cache: s.cache}
	s.mu.Lock()
	d := s.pol.Decide(s.cfg.Now(), r, ld.cached)
	c := s.join(d)
	s.mu.Unlock()
	if d.Action == Cached {
		return &Answer{Digest: d.Digest, Manifest: ld.got[d.Digest]}, nil
	}
	if d.Action != Wait {
		s.lead(d, c, func(ctx context.Context) (*Answer, error) {
			return s.upstream(ctx, reg, r, req.Authorization, d, ld.got[d.Digest])
		})
	}
	if s.onWait != nil {
		s.onWait()
	}
	ans, err := s.wait(ctx, c)
	if err != nil && upstream.IsUnavailable(err) {
		ld := &loader{cache: s.cache}
		s.mu.Lock()
		digest, ok := s.pol.Stale(r, ld.cached)
		s.mu.Unlock()
		if ok {
			s.staleAnswers.Add(1)
			msg := "upstream unavailable: answering the tag's last resolution"
			if r.IsDigest() {
				msg = "upstream unavailable: answering a manifest these credentials were given before"
			}
			s.log.Warn(msg, zap.String("registry", reg.Host), zap.String("repo", r.Repo), zap.String("ref", r.Ref),
				zap.String("digest", digest), zap.Error(err))
			return &Answer{Digest: digest, Manifest: ld.got[digest], Stale: !r.IsDigest()}, nil
		}
	}
	return ans, err
}

// join is called with s.mu held, with the Decision just made: the call a
// waiter waits on, or a new one for a leader, which waiters can see as
// soon as s.mu is released.
func (s *Service) join(d Decision) *call {
	switch {
	case d.Flight == nil:
		return nil
	case d.Action == Wait:
		return d.Flight.Data.(*call)
	default:
		c := &call{done: make(chan struct{})}
		d.Flight.Data = c
		return c
	}
}

// lead runs a flight's upstream exchange once for all its askers, on a
// context of its own: an asker that goes away does not cancel it for the
// others.
func (s *Service) lead(d Decision, c *call, fn func(context.Context) (*Answer, error)) {
	go func() {
		fctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
		defer cancel()
		c.ans, c.err = fn(fctx)
		s.mu.Lock()
		s.pol.End(d.Flight)
		s.mu.Unlock()
		close(c.done)
	}()
}

// wait waits for a flight's outcome, until the caller's ctx ends.
func (s *Service) wait(ctx context.Context, c *call) (*Answer, error) {
	select {
	case <-c.done:
		return c.ans, c.err
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for upstream manifest answer: %w", ctx.Err())
	}
}

// upstream is a flight leader's exchange with upstream. cached is the
// manifest the cache holds for a HeadDigest.
func (s *Service) upstream(ctx context.Context, reg upstream.Registry, r Request, authz string, d Decision, cached store.Manifest) (*Answer, error) {
	switch d.Action {
	case HeadTag:
		return s.resolveTag(ctx, reg, r, authz)
	case Get:
		ans, err := s.fetch(ctx, reg, r.Repo, d.Ref, authz)
		if err != nil {
			return nil, err
		}
		s.granted(reg, r, ans, authz)
		return ans, nil
	case HeadDigest:
		s.upstreamHEADs.Add(1)
		resp, err := s.up.Do(ctx, upstream.Request{
			Registry: reg, Repo: r.Repo, Method: http.MethodHead, Path: "manifests/" + d.Ref,
			Authorization: authz, Header: acceptHeader(),
		})
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		ans := &Answer{Digest: d.Digest, Manifest: cached}
		s.granted(reg, r, ans, authz)
		return ans, nil
	}
	return nil, fmt.Errorf("manifest policy: unexpected action %v", d.Action)
}

// granted records upstream's yes to these credentials for ans.
func (s *Service) granted(reg upstream.Registry, r Request, ans *Answer, authz string) {
	s.mu.Lock()
	s.pol.Granted(s.cfg.Now(), reg.Host, r.Repo, ans.Digest, r.Cred)
	s.mu.Unlock()
	s.onGrant(reg, r.Repo, ans, authz)
}

// resolveTag asks upstream what the tag names now, with a HEAD, and gets
// the manifest by digest unless it is already here.
func (s *Service) resolveTag(ctx context.Context, reg upstream.Registry, r Request, authz string) (*Answer, error) {
	s.upstreamHEADs.Add(1)
	resp, err := s.up.Do(ctx, upstream.Request{
		Registry: reg, Repo: r.Repo, Method: http.MethodHead, Path: "manifests/" + r.Ref,
		Authorization: authz, Header: acceptHeader(),
	})
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	digest := resp.Header.Get("Docker-Content-Digest")
	if !swarmprotoDigest(digest) {
		digest = ""
	}
	ld := &loader{cache: s.cache}
	s.mu.Lock()
	d := s.pol.Headed(s.cfg.Now(), r, digest, ld.cached)
	c := s.join(d)
	s.mu.Unlock()
	var ans *Answer
	switch {
	case d.Action == Cached:
		ans = &Answer{Digest: d.Digest, Manifest: ld.got[d.Digest]}
	case d.Flight == nil:
		// Upstream sent no usable digest: the tag's GET gives the body to hash.
		if ans, err = s.fetch(ctx, reg, r.Repo, r.Ref, authz); err != nil {
			return nil, err
		}
	default:
		// Upstream just named this digest in this repository to these
		// credentials: the body may come from a GET made for other
		// credentials' resolution of it, so there is one GET per digest.
		if d.Action == Get {
			s.lead(d, c, func(ctx context.Context) (*Answer, error) { return s.fetch(ctx, reg, r.Repo, d.Ref, authz) })
		}
		if s.onBody != nil {
			s.onBody()
		}
		if ans, err = s.wait(ctx, c); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.pol.Resolved(s.cfg.Now(), r, ans.Digest)
	s.mu.Unlock()
	s.onGrant(reg, r.Repo, ans, authz)
	if err := s.cache.PutTag(reg.Host, r.Repo, r.Ref, ans.Digest); err != nil {
		s.log.Warn("remember tag", zap.String("tag", r.Ref), zap.Error(err))
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

func (s *Service) onGrant(reg upstream.Registry, repo string, ans *Answer, authz string) {
	if s.cfg.OnGrant != nil {
		s.cfg.OnGrant(reg.Host, repo, ans.Digest, authz, ans.Manifest.Body)
	}
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
