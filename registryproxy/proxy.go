// Package registryproxy is the containerd-facing side of an agent: the OCI
// distribution read API served as a pull-through mirror. It resolves tags
// upstream, caches manifests by digest and gets blob bytes from a
// BlobSource. It knows nothing of peers or pieces.
package registryproxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/access"
	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/upstream"
)

// BlobRequest names a blob and carries what is needed to fetch it upstream.
type BlobRequest struct {
	Registry upstream.Registry
	Repo     string
	Digest   string
	// Authorization is the client's header, forwarded when fetching.
	Authorization string
}

// Blob is an open blob. ReadAt waits for bytes that are still in flight.
type Blob interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// BlobSource supplies blob bytes.
type BlobSource interface {
	OpenBlob(ctx context.Context, req BlobRequest) (Blob, error)
	// Stat returns the size of a blob that is here or on its way, without
	// starting a fetch.
	Stat(digest string) (size int64, ok bool)
	// Prefetch starts fetching a blob nobody reads yet; it does not block.
	Prefetch(req BlobRequest)
}

// ManifestCache keeps manifests by digest and the last digest of each tag.
type ManifestCache interface {
	PutManifest(digest string, m store.Manifest) error
	Manifest(digest string) (store.Manifest, error)
	PutTag(registry, repo, tag, digest string) error
	Tag(registry, repo, tag string) (string, error)
}

// ManifestSource answers manifest requests in upstream's stead: the
// supernode that owns the image, which resolves each tag once for the
// cluster. It must answer only what upstream gives the request's
// credentials; any error sends the request upstream as without it.
type ManifestSource interface {
	Manifest(ctx context.Context, req ManifestRequest) (ManifestAnswer, error)
}

// ManifestRequest names a manifest by tag or digest, with the client's
// credentials.
type ManifestRequest struct {
	Registry      upstream.Registry
	Repo          string
	Ref           string
	Authorization string
}

// ManifestAnswer is a manifest (its digest checked against its body).
type ManifestAnswer struct {
	Digest   string
	Manifest store.Manifest
	// Stale: upstream was unavailable; this is the tag's last resolution.
	Stale bool
}

// Config wires a Proxy.
type Config struct {
	Registries *upstream.Set
	Upstream   *upstream.Client
	Manifests  ManifestCache
	Blobs      BlobSource
	// Source, when set, is asked for tags and uncached manifests before
	// upstream.
	Source ManifestSource
	// AuthTTL is how long upstream's answer that a client's credentials
	// may read a digest in a repository lets it read that cached content
	// without asking upstream again. Negative disables the check (anyone
	// who reaches the mirror may read anything it has cached).
	AuthTTL time.Duration
	// Prefetch starts fetching an image's config and layers as soon as its
	// manifest goes through, instead of when the client asks for each one
	// (containerd fetches at most 3 at a time).
	Prefetch bool
	Log      *zap.Logger
	Now      func() time.Time
}

// Proxy is the mirror's HTTP handler.
type Proxy struct {
	cfg    Config
	access *access.Checker
	log    *zap.Logger
}

// maxManifestBytes follows the distribution spec's recommended limit.
const maxManifestBytes = 4 << 20

// New builds a Proxy.
func New(cfg Config) *Proxy {
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	return &Proxy{cfg: cfg, access: access.New(cfg.Upstream, cfg.AuthTTL, now), log: cfg.Log}
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	err := p.serve(sw, r)
	if err != nil {
		reply := err
		var oe *ocierr.Error
		if !errors.As(err, &oe) && errors.Is(err, upstream.ErrUnreachable) {
			reply = unreachable(err)
		}
		ocierr.Write(sw, r, reply)
	}
	fields := []zap.Field{
		zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.String("ns", r.URL.Query().Get("ns")),
		zap.Int("status", sw.status), zap.Int64("bytes", sw.bytes), zap.Duration("elapsed", time.Since(start)),
	}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	p.log.Debug("request", fields...)
}

func (p *Proxy) serve(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return ocierr.New(http.StatusMethodNotAllowed, ocierr.Unsupported, "this mirror is read-only")
	}
	route, err := ParseRoute(r.URL.Path)
	if err != nil {
		return err
	}
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if route.Kind == KindBase {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(w, "{}")
		}
		return nil
	}
	ns := r.URL.Query().Get("ns")
	reg, ok := p.cfg.Registries.Lookup(ns)
	if !ok {
		return ocierr.New(http.StatusForbidden, ocierr.Denied, "registry %q is not mirrored here", ns)
	}
	if route.Kind == KindManifest {
		return p.serveManifest(w, r, reg, route)
	}
	return p.serveBlob(w, r, reg, route)
}

func (p *Proxy) serveManifest(w http.ResponseWriter, r *http.Request, reg upstream.Registry, route Route) error {
	authz := r.Header.Get("Authorization")
	if route.IsDigest() {
		if m, err := p.cfg.Manifests.Manifest(route.Ref); err == nil {
			// Cached by digest alone: served only if upstream gives this
			// digest in this repository to these credentials.
			if err := p.access.CheckManifest(r.Context(), reg, route.Repo, route.Ref, authz, m.Body); err != nil {
				return err
			}
			if p.cfg.Prefetch && r.Method == http.MethodGet {
				p.prefetch(reg, route.Repo, authz, m) // blobs may have been evicted
			}
			return writeManifest(w, r, route.Ref, m)
		}
	}
	if p.cfg.Source != nil && p.serveFromSource(w, r, reg, route, authz) {
		return nil
	}
	hdr := http.Header{}
	for _, a := range r.Header.Values("Accept") {
		hdr.Add("Accept", a)
	}
	resp, err := p.cfg.Upstream.Do(r.Context(), upstream.Request{
		Registry: reg, Repo: route.Repo, Method: r.Method, Path: "manifests/" + route.Ref,
		Authorization: authz, Header: hdr,
	})
	if err != nil {
		if !route.IsDigest() && upstream.IsUnavailable(err) {
			if served := p.serveStaleTag(w, r, reg, route, authz, err); served {
				return nil
			}
		}
		return err
	}
	defer resp.Body.Close()
	if r.Method == http.MethodHead {
		if !route.IsDigest() {
			p.rememberHeadTag(r.Context(), reg, route, authz, hdr, resp.Header.Get("Docker-Content-Digest"))
		}
		if d := resp.Header.Get("Docker-Content-Digest"); sha256Pattern.MatchString(d) && (!route.IsDigest() || d == route.Ref) {
			// Upstream just gave this digest to these credentials; a
			// cached body (verified by its digest) grants what it names.
			if m, err := p.cfg.Manifests.Manifest(d); err == nil {
				p.access.AllowManifest(reg.Host, route.Repo, d, authz, m.Body)
			} else {
				p.access.Allow(reg.Host, route.Repo, d, authz)
			}
		}
		for _, h := range []string{"Content-Type", "Content-Length", "Docker-Content-Digest"} {
			if v := resp.Header.Get(h); v != "" {
				w.Header().Set(h, v)
			}
		}
		w.WriteHeader(http.StatusOK)
		return nil
	}
	digest, m, err := readManifest(resp, route)
	if err != nil {
		return err
	}
	p.access.AllowManifest(reg.Host, route.Repo, digest, authz, m.Body)
	if p.cfg.Prefetch {
		p.prefetch(reg, route.Repo, authz, m)
	}
	if err := p.cfg.Manifests.PutManifest(digest, m); err != nil {
		p.log.Warn("cache manifest", zap.String("digest", digest), zap.Error(err))
	} else if !route.IsDigest() {
		if err := p.cfg.Manifests.PutTag(reg.Host, route.Repo, route.Ref, digest); err != nil {
			p.log.Warn("remember tag", zap.String("tag", route.Ref), zap.Error(err))
		}
	}
	return writeManifest(w, r, digest, m)
}

// readManifest reads and checks an upstream manifest response: size-capped,
// and hashing to the digest asked for, if one was.
func readManifest(resp *http.Response, route Route) (string, store.Manifest, error) {
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestBytes+1))
	if err != nil {
		return "", store.Manifest{}, ocierr.New(http.StatusBadGateway, ocierr.Unavailable, "read manifest from upstream: %v", err)
	}
	if len(body) > maxManifestBytes {
		return "", store.Manifest{}, ocierr.New(http.StatusBadGateway, ocierr.ManifestInvalid, "upstream manifest exceeds %d bytes", maxManifestBytes)
	}
	sum := sha256.Sum256(body)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if route.IsDigest() && digest != route.Ref {
		return "", store.Manifest{}, ocierr.New(http.StatusBadGateway, ocierr.ManifestInvalid, "upstream manifest hashes to %s, not %s", digest, route.Ref)
	}
	return digest, store.Manifest{MediaType: resp.Header.Get("Content-Type"), Body: body}, nil
}

// rememberHeadTag records the digest upstream gave for a HEAD of a tag, so
// the tag can be answered from the cache while upstream is down: containerd
// resolves tags with a HEAD and GETs only by digest. The manifest it names is
// fetched now if it is not cached; the client's GET by digest that follows
// is then served from the cache, so upstream sees no extra request. Failures
// are logged and leave the tag unremembered; the HEAD is answered anyway.
func (p *Proxy) rememberHeadTag(ctx context.Context, reg upstream.Registry, route Route, authz string, hdr http.Header, digest string) {
	log := p.log.With(zap.String("registry", reg.Host), zap.String("repo", route.Repo), zap.String("tag", route.Ref), zap.String("digest", digest))
	if !sha256Pattern.MatchString(digest) {
		log.Debug("upstream HEAD of a tag gave no usable Docker-Content-Digest; tag not remembered")
		return
	}
	if _, err := p.cfg.Manifests.Manifest(digest); err != nil {
		resp, err := p.cfg.Upstream.Do(ctx, upstream.Request{
			Registry: reg, Repo: route.Repo, Method: http.MethodGet, Path: "manifests/" + digest,
			Authorization: authz, Header: hdr,
		})
		if err != nil {
			log.Warn("fetch the manifest a tag's HEAD named; tag not remembered", zap.Error(err))
			return
		}
		_, m, err := readManifest(resp, Route{Kind: KindManifest, Repo: route.Repo, Ref: digest})
		resp.Body.Close()
		if err != nil {
			log.Warn("fetch the manifest a tag's HEAD named; tag not remembered", zap.Error(err))
			return
		}
		if err := p.cfg.Manifests.PutManifest(digest, m); err != nil {
			log.Warn("cache manifest", zap.Error(err))
			return
		}
	}
	if err := p.cfg.Manifests.PutTag(reg.Host, route.Repo, route.Ref, digest); err != nil {
		log.Warn("remember tag", zap.Error(err))
	}
}

// serveFromSource answers a manifest request from the ManifestSource. It
// returns false, having written nothing, when the source cannot answer or
// its answer is of a type the client does not accept; the caller then asks
// upstream, as it would without a source.
func (p *Proxy) serveFromSource(w http.ResponseWriter, r *http.Request, reg upstream.Registry, route Route, authz string) bool {
	ans, err := p.cfg.Source.Manifest(r.Context(), ManifestRequest{Registry: reg, Repo: route.Repo, Ref: route.Ref, Authorization: authz})
	if err != nil {
		p.log.Debug("manifest source did not answer; asking upstream", zap.String("registry", reg.Host),
			zap.String("repo", route.Repo), zap.String("ref", route.Ref), zap.Error(err))
		return false
	}
	if !accepts(r.Header.Values("Accept"), ans.Manifest.MediaType) {
		p.log.Debug("manifest source answered a type the client does not accept; asking upstream",
			zap.String("ref", route.Ref), zap.String("media_type", ans.Manifest.MediaType))
		return false
	}
	// The source had upstream accept these credentials for this manifest.
	p.access.AllowManifest(reg.Host, route.Repo, ans.Digest, authz, ans.Manifest.Body)
	if ans.Stale {
		p.log.Warn("upstream unavailable: serving tag as the cluster last resolved it", zap.String("registry", reg.Host),
			zap.String("repo", route.Repo), zap.String("tag", route.Ref), zap.String("digest", ans.Digest))
	}
	if err := p.cfg.Manifests.PutManifest(ans.Digest, ans.Manifest); err != nil {
		p.log.Warn("cache manifest", zap.String("digest", ans.Digest), zap.Error(err))
	} else if !route.IsDigest() && !ans.Stale {
		if err := p.cfg.Manifests.PutTag(reg.Host, route.Repo, route.Ref, ans.Digest); err != nil {
			p.log.Warn("remember tag", zap.String("tag", route.Ref), zap.Error(err))
		}
	}
	if p.cfg.Prefetch && r.Method == http.MethodGet {
		p.prefetch(reg, route.Repo, authz, ans.Manifest)
	}
	_ = writeManifest(w, r, ans.Digest, ans.Manifest)
	return true
}

// accepts reports whether a client's Accept headers allow a manifest media
// type. No Accept header, or no media type to compare, accepts.
func accepts(accept []string, mediaType string) bool {
	mt, _, _ := strings.Cut(mediaType, ";")
	mt = strings.TrimSpace(mt)
	if len(accept) == 0 || mt == "" {
		return true
	}
	for _, h := range accept {
		for _, a := range strings.Split(h, ",") {
			a, _, _ = strings.Cut(a, ";")
			switch a = strings.TrimSpace(a); {
			case a == "*/*" || strings.EqualFold(a, mt):
				return true
			case strings.HasSuffix(a, "/*") && strings.HasPrefix(mt, strings.TrimSuffix(a, "*")):
				return true
			}
		}
	}
	return false
}

// imageManifest is the part of an image manifest (OCI or Docker schema 2)
// that names its blobs. Indexes have no config and are not prefetched: that
// would pull every platform.
type imageManifest struct {
	Config struct {
		Digest string `json:"digest"`
	} `json:"config"`
	Layers []struct {
		Digest string `json:"digest"`
	} `json:"layers"`
}

const maxPrefetchBlobs = 256

func (p *Proxy) prefetch(reg upstream.Registry, repo, authz string, m store.Manifest) {
	var im imageManifest
	if json.Unmarshal(m.Body, &im) != nil || im.Config.Digest == "" {
		return
	}
	digests := []string{im.Config.Digest}
	for _, l := range im.Layers {
		digests = append(digests, l.Digest)
	}
	for _, d := range digests[:min(len(digests), maxPrefetchBlobs)] {
		if sha256Pattern.MatchString(d) {
			p.cfg.Blobs.Prefetch(BlobRequest{Registry: reg, Repo: repo, Digest: d, Authorization: authz})
		}
	}
}

// serveStaleTag answers a tag from cache while the upstream is down, for a
// client that upstream let read the repository before.
func (p *Proxy) serveStaleTag(w http.ResponseWriter, r *http.Request, reg upstream.Registry, route Route, authz string, cause error) bool {
	digest, err := p.cfg.Manifests.Tag(reg.Host, route.Repo, route.Ref)
	if err != nil {
		return false
	}
	m, err := p.cfg.Manifests.Manifest(digest)
	if err != nil || !p.access.AllowedStale(reg.Host, route.Repo, digest, authz) {
		return false
	}
	p.log.Warn("upstream unavailable: serving tag from cache", zap.String("registry", reg.Host),
		zap.String("repo", route.Repo), zap.String("tag", route.Ref), zap.String("digest", digest), zap.Error(cause))
	_ = writeManifest(w, r, digest, m)
	return true
}

// unreachable is the 502 for an upstream that gave no answer: it names the
// cause class (plain HTTP, untrusted certificate, DNS, refused, ...) and
// nothing internal; the full error is in the agent's log.
func unreachable(err error) error {
	return ocierr.New(http.StatusBadGateway, ocierr.Unavailable, "upstream unreachable: %s", upstream.Cause(err))
}

func writeManifest(w http.ResponseWriter, r *http.Request, digest string, m store.Manifest) error {
	h := w.Header()
	if m.MediaType != "" {
		h.Set("Content-Type", m.MediaType)
	}
	h.Set("Docker-Content-Digest", digest)
	h.Set("Content-Length", strconv.Itoa(len(m.Body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(m.Body)
	}
	return nil
}

func (p *Proxy) serveBlob(w http.ResponseWriter, r *http.Request, reg upstream.Registry, route Route) error {
	authz := r.Header.Get("Authorization")
	// Blobs are stored and shared by digest alone: this digest is served
	// (from the cache, the swarm or upstream) only if upstream gives it in
	// this repository to these credentials.
	if err := p.access.Check(r.Context(), reg, route.Repo, access.Blob, route.Ref, authz); err != nil {
		return err
	}
	if r.Method == http.MethodHead {
		if _, ok := p.cfg.Blobs.Stat(route.Ref); !ok {
			// Answer a HEAD without pulling the whole blob in.
			return p.headUpstream(w, r, reg, route, authz)
		}
	}
	blob, err := p.cfg.Blobs.OpenBlob(r.Context(), BlobRequest{Registry: reg, Repo: route.Repo, Digest: route.Ref, Authorization: authz})
	if err != nil {
		var oe *ocierr.Error
		if errors.As(err, &oe) {
			return err
		}
		if errors.Is(err, upstream.ErrUnreachable) {
			return unreachable(err)
		}
		if r.Context().Err() != nil {
			return ocierr.New(499, ocierr.Unknown, "client went away")
		}
		if errors.Is(err, store.ErrDiskFull) {
			p.log.Warn("blob not fetched: data disk full", zap.String("digest", route.Ref), zap.Error(err))
			return ocierr.New(http.StatusInsufficientStorage, ocierr.Unavailable, "the mirror's data disk is full")
		}
		p.log.Warn("open blob", zap.String("digest", route.Ref), zap.Error(err))
		return ocierr.New(http.StatusBadGateway, ocierr.Unavailable, "blob could not be fetched")
	}
	defer blob.Close()

	size := blob.Size()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", route.Ref)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Etag", `"`+route.Ref+`"`)
	rng, partial, err := ParseRange(r.Header.Get("Range"), size)
	if err != nil {
		h.Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		return ocierr.New(http.StatusRequestedRangeNotSatisfiable, ocierr.RangeInvalid, "%v", err)
	}
	status := http.StatusOK
	if !partial {
		rng = ByteRange{Start: 0, End: size - 1}
	} else {
		status = http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", rng.Start, rng.End, size))
	}
	h.Set("Content-Length", strconv.FormatInt(rng.Len(), 10))
	w.WriteHeader(status)
	if r.Method == http.MethodHead || rng.Len() == 0 {
		return nil
	}
	if err := copyRange(w, blob, rng); err != nil {
		// Headers are gone; the short body makes the client see the failure.
		p.log.Warn("blob response cut short", zap.String("digest", route.Ref), zap.Error(err))
	}
	return nil
}

func (p *Proxy) headUpstream(w http.ResponseWriter, r *http.Request, reg upstream.Registry, route Route, authz string) error {
	resp, err := p.cfg.Upstream.Do(r.Context(), upstream.Request{
		Registry: reg, Repo: route.Repo, Method: http.MethodHead, Path: "blobs/" + route.Ref, Authorization: authz,
	})
	if err != nil {
		return err
	}
	resp.Body.Close()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", route.Ref)
	h.Set("Accept-Ranges", "bytes")
	if resp.ContentLength >= 0 {
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	w.WriteHeader(http.StatusOK)
	return nil
}

// copyBuf is copyRange's buffer: each read of the blob and each write to
// the client moves 256 KiB, so a blob costs an eighth of the system calls
// of io.Copy's 32 KiB.
const copyBuf = 256 << 10

// copyRange streams the range. (Complete blobs go through the Blob too,
// not sendfile: the blob cache re-hashes them as they are read.)
func copyRange(w io.Writer, blob Blob, rng ByteRange) error {
	buf := make([]byte, min(copyBuf, max(rng.Len(), 1)))
	_, err := io.CopyBuffer(w, io.NewSectionReader(blob, rng.Start, rng.Len()), buf)
	return err
}

type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	n, err := s.ResponseWriter.Write(b)
	s.bytes += int64(n)
	return n, err
}
