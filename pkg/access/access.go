// Package access decides whether a client may read a digest in a
// repository of a registry: only if upstream said so, for that digest, in
// that repository, to those credentials. Positive answers are remembered
// for a TTL (credentials are kept as a hash, never as they are); anything
// else is asked upstream with a HEAD of the exact path. Content is stored
// and shared by digest, so this is what keeps a private layer from being
// served to a client that names it under a repository it may read.
package access

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/upstream"
)

// Kind is the API a digest is checked under.
type Kind string

const (
	Blob     Kind = "blobs"
	Manifest Kind = "manifests"
)

// Checker holds upstream's recent positive answers.
type Checker struct {
	up  *upstream.Client
	ttl time.Duration
	now func() time.Time

	mu   sync.Mutex
	seen map[string]time.Time
	// flight makes concurrent checks of one grant (a rollout's agents
	// polling one blob with the same credentials) one upstream HEAD.
	flight singleflight.Group
}

// headTimeout bounds one upstream check, shared by every caller waiting
// on it, so that one caller going away does not fail the others.
const headTimeout = 30 * time.Second

// maxEntries bounds memory against clients cycling tokens or digests
// (about 200 bytes an entry).
const maxEntries = 1 << 16

// New builds a Checker asking up. A negative ttl turns checking off: every
// request is allowed (the operator's choice: anyone who reaches the node
// may read anything it has). Zero asks upstream every time.
func New(up *upstream.Client, ttl time.Duration, now func() time.Time) *Checker {
	if now == nil {
		now = time.Now
	}
	return &Checker{up: up, ttl: ttl, now: now, seen: map[string]time.Time{}}
}

// Off reports whether checking is turned off.
func (c *Checker) Off() bool { return c.ttl < 0 }

func key(registry, repo, digest, authorization string) string {
	sum := sha256.Sum256([]byte(authorization))
	return registry + "\x00" + repo + "\x00" + digest + "\x00" + hex.EncodeToString(sum[:16])
}

// Allow records that upstream gave digest in registry/repo to these
// credentials (registry is the host clients name).
func (c *Checker) Allow(registry, repo, digest, authorization string) {
	k := key(registry, repo, digest, authorization)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.seen) >= maxEntries {
		now := c.now()
		for k, t := range c.seen {
			if now.Sub(t) > c.ttl {
				delete(c.seen, k)
			}
		}
		// Still full of fresh grants: forget a random half (map order),
		// which only costs those clients a HEAD each.
		for k := range c.seen {
			if len(c.seen) < maxEntries/2 {
				break
			}
			delete(c.seen, k)
		}
	}
	c.seen[k] = c.now()
}

// maxChildren bounds the grants one manifest gives.
const maxChildren = 1024

var sha256Digest = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// AllowManifest records the grant of a manifest upstream just gave these
// credentials, and of the blobs and manifests it names (config, layers,
// an index's children) in the same repository: a registry only accepts a
// manifest whose references are in the repository, so this never grants
// what upstream would refuse, and spares a HEAD per layer per node.
func (c *Checker) AllowManifest(registry, repo, digest, authorization string, body []byte) {
	c.Allow(registry, repo, digest, authorization)
	var m struct {
		Config    *struct{ Digest string }  `json:"config"`
		Layers    []struct{ Digest string } `json:"layers"`
		Manifests []struct{ Digest string } `json:"manifests"`
	}
	if json.Unmarshal(body, &m) != nil {
		return
	}
	refs := append(m.Layers, m.Manifests...)
	if m.Config != nil {
		refs = append(refs, *m.Config)
	}
	for _, r := range refs[:min(len(refs), maxChildren)] {
		if sha256Digest.MatchString(r.Digest) {
			c.Allow(registry, repo, r.Digest, authorization)
		}
	}
}

// Allowed reports a grant younger than the TTL (always, when off).
func (c *Checker) Allowed(registry, repo, digest, authorization string) bool {
	if c.Off() {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.seen[key(registry, repo, digest, authorization)]
	return ok && c.now().Sub(t) <= c.ttl
}

// AllowedStale reports any grant still remembered: used only while
// upstream cannot be asked.
func (c *Checker) AllowedStale(registry, repo, digest, authorization string) bool {
	if c.Off() {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.seen[key(registry, repo, digest, authorization)]
	return ok
}

// Check returns nil if these credentials may read digest (of kind) in
// reg/repo: a fresh grant, or upstream answering a HEAD of exactly that
// path, or (upstream unreachable or failing) a grant remembered from
// before. Otherwise it returns upstream's refusal as an *ocierr.Error
// (401 with its challenge, 403, 404), or a 502 when upstream could not be
// asked and nothing is remembered.
func (c *Checker) Check(ctx context.Context, reg upstream.Registry, repo string, kind Kind, digest, authorization string) error {
	_, err := c.check(ctx, reg, repo, kind, digest, authorization)
	return err
}

// CheckManifest is Check for a manifest whose body is at hand: when
// upstream is asked and confirms it, the blobs and manifests it names are
// granted too (see AllowManifest).
func (c *Checker) CheckManifest(ctx context.Context, reg upstream.Registry, repo, digest, authorization string, body []byte) error {
	asked, err := c.check(ctx, reg, repo, Manifest, digest, authorization)
	if err == nil && asked {
		c.AllowManifest(reg.Host, repo, digest, authorization, body)
	}
	return err
}

// check reports whether upstream confirmed access just now.
func (c *Checker) check(ctx context.Context, reg upstream.Registry, repo string, kind Kind, digest, authorization string) (bool, error) {
	if c.Allowed(reg.Host, repo, digest, authorization) {
		return false, nil
	}
	ch := c.flight.DoChan(key(reg.Host, repo, digest, authorization), func() (any, error) {
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), headTimeout)
		defer cancel()
		resp, err := c.up.Do(hctx, upstream.Request{
			Registry: reg, Repo: repo, Method: http.MethodHead, Path: string(kind) + "/" + digest, Authorization: authorization,
		})
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		c.Allow(reg.Host, repo, digest, authorization)
		return nil, nil
	})
	var err error
	select {
	case r := <-ch:
		err = r.Err
	case <-ctx.Done():
		return false, fmt.Errorf("check access to %s in %s/%s: %w", digest, reg.Host, repo, ctx.Err())
	}
	if err != nil {
		if upstream.IsUnavailable(err) && c.AllowedStale(reg.Host, repo, digest, authorization) {
			return false, nil
		}
		var oe *ocierr.Error
		if errors.As(err, &oe) {
			return false, err
		}
		return false, &ocierr.Error{Status: http.StatusBadGateway, Code: ocierr.Unavailable,
			Message: "cannot confirm access: upstream unreachable: " + upstream.Cause(err), Cause: fmt.Errorf("check access: %w", err)}
	}
	return true, nil
}
