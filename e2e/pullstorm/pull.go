package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"

	"github.com/starling-oci/starling/pkg/ratelimit"
)

// maxConcurrentBlobs is how many blobs one client fetches at once, like
// containerd's default of 3 concurrent layer downloads.
const maxConcurrentBlobs = 3

// maxManifestBytes bounds the manifest a client reads.
const maxManifestBytes = 4 << 20

// pullSpec is what one client pulls and how it checks it.
type pullSpec struct {
	registryURL string // http://host:port of the agent mirror or the registry
	repo, tag   string
	want        *testImage
}

// pullImage pulls spec like a container runtime would: the manifest by tag,
// then the config and layers, up to maxConcurrentBlobs at once, and checks
// the manifest's and every blob's sha256 digest and size. base carries the
// requests (it may pace the node's download link); every body byte read is
// added to moved.
func pullImage(ctx context.Context, spec pullSpec, base http.RoundTripper, moved *atomic.Int64) error {
	host, insecure, err := splitRegistryURL(spec.registryURL)
	if err != nil {
		return err
	}
	var nopts []name.Option
	if insecure {
		nopts = append(nopts, name.Insecure)
	}
	repo, err := name.NewRepository(host+"/"+spec.repo, nopts...)
	if err != nil {
		return fmt.Errorf("repository: %w", err)
	}
	// The go-containerregistry transport does the registry's auth dance
	// (ping /v2/, anonymous bearer tokens), as clients do.
	rt, err := transport.NewWithContext(ctx, repo.Registry, authn.Anonymous, base, []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return fmt.Errorf("connect to %s: %w", host, err)
	}
	client := &http.Client{Transport: rt}
	prefix := fmt.Sprintf("%s://%s/v2/%s", repo.Registry.Scheme(), host, spec.repo)

	raw, err := get(ctx, client, prefix+"/manifests/"+spec.tag, moved, maxManifestBytes,
		string(types.DockerManifestSchema2), string(types.OCIManifestSchema1))
	if err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if got := sha256Hash(raw); got != spec.want.manifestDigest {
		return fmt.Errorf("manifest digest %s, want %s", got, spec.want.manifestDigest)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("parse manifest: %w", err)
	}
	blobs := append([]v1.Descriptor{m.Config}, m.Layers...)

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(maxConcurrentBlobs)
	for _, b := range blobs {
		g.Go(func() error {
			if err := getBlob(gctx, client, prefix, b, moved); err != nil {
				return fmt.Errorf("blob %s: %w", b.Digest, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// getBlob streams one blob through sha256 and checks digest and size.
func getBlob(ctx context.Context, client *http.Client, prefix string, b v1.Descriptor, moved *atomic.Int64) error {
	if b.Digest.Algorithm != "sha256" {
		return fmt.Errorf("unsupported digest algorithm %q", b.Digest.Algorithm)
	}
	resp, err := do(ctx, client, prefix+"/blobs/"+b.Digest.String())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	h := sha256.New()
	cr := &countingReader{r: resp.Body, n: moved}
	n, err := io.Copy(h, cr)
	if err != nil {
		// The longest wait for a read says which side stalled: a client
		// that got no CPU for a minute, or a server that sent nothing.
		return fmt.Errorf("read after %d bytes (longest Read %v, the failing one %v; longest gap between Reads %v): %w",
			n, cr.longest.Round(time.Millisecond), cr.lastRead.Round(time.Millisecond), cr.gap.Round(time.Millisecond), err)
	}
	if n != b.Size {
		return fmt.Errorf("got %d bytes, want %d", n, b.Size)
	}
	if got := hashOf(h); got != b.Digest {
		return fmt.Errorf("content hashes to %s", got)
	}
	return nil
}

// get fetches a small document (up to limit bytes).
func get(ctx context.Context, client *http.Client, u string, moved *atomic.Int64, limit int64, accept ...string) ([]byte, error) {
	resp, err := do(ctx, client, u, accept...)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(&countingReader{r: resp.Body, n: moved}, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", u, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: larger than %d bytes", u, limit)
	}
	return b, nil
}

// do sends a GET and returns the response if its status is 200.
func do(ctx context.Context, client *http.Client, u string, accept ...string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("request %s: %w", u, err)
	}
	for _, a := range accept {
		req.Header.Add("Accept", a)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	return resp, nil
}

func sha256Hash(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

func hashOf(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
}

// countingReader adds the bytes it reads to n, and keeps how long the
// longest and the last Read took (the server was slow) and the longest
// gap between two Reads (the client was).
type countingReader struct {
	r                      io.Reader
	n                      *atomic.Int64
	end                    time.Time
	longest, lastRead, gap time.Duration
}

func (c *countingReader) Read(p []byte) (int, error) {
	start := time.Now()
	if !c.end.IsZero() {
		c.gap = max(c.gap, start.Sub(c.end))
	}
	defer func() { c.end = time.Now() }()
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	c.lastRead = time.Since(start)
	c.longest = max(c.longest, c.lastRead)
	return n, err
}

// pacedTransport emulates a node's download link in direct mode: every
// response body it returns is read through the node's token bucket.
type pacedTransport struct {
	base  http.RoundTripper
	limit *ratelimit.Limiter // nil = unlimited
}

func (t *pacedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || t.limit == nil {
		return resp, err
	}
	resp.Body = &pacedBody{Reader: t.limit.Reader(req.Context(), resp.Body), Closer: resp.Body}
	return resp, nil
}

type pacedBody struct {
	io.Reader
	io.Closer
}

// splitRegistryURL turns http(s)://host[:port] into host[:port] and
// whether the registry must be reached over plain HTTP.
func splitRegistryURL(s string) (host string, insecure bool, err error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", false, fmt.Errorf("registry URL %q: %w", s, err)
	}
	if u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return "", false, fmt.Errorf("registry URL %q: want http(s)://host[:port]", s)
	}
	return u.Host, u.Scheme == "http", nil
}
