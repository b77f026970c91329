package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/starling-oci/starling/e2e/internal/regreq"
	"github.com/starling-oci/starling/pkg/ratelimit"
)

// upstream is the registry every mode pulls from: either an embedded
// go-containerregistry registry (blobs in memory) or a reverse proxy to a
// registry given with -registry. Either way it sits behind egressHandler,
// so the egress of each mode is counted and capped on our side of the link.
type upstream struct {
	srv     *http.Server
	ln      net.Listener
	egress  *egressHandler
	served  chan struct{} // closed when Serve has returned
	pushURL string        // where to push the image: ourselves, or the external registry
}

// startUpstream listens on 127.0.0.1:0 and serves either an embedded
// registry (external == "") or a proxy to external. egressBytesPerSec caps
// the bytes written in responses to GET and HEAD (0 = unlimited).
func startUpstream(external string, egressBytesPerSec int64) (*upstream, error) {
	var inner http.Handler
	var pushURL string
	if external == "" {
		inner = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	} else {
		target, err := url.Parse(external)
		if err != nil {
			return nil, fmt.Errorf("parse -registry %q: %w", external, err)
		}
		if (target.Scheme != "http" && target.Scheme != "https") || target.Host == "" || (target.Path != "" && target.Path != "/") {
			return nil, fmt.Errorf("-registry %q: want http(s)://host[:port] with no path", external)
		}
		inner = &httputil.ReverseProxy{
			Rewrite: func(r *httputil.ProxyRequest) {
				r.SetURL(target)
				r.Out.Host = target.Host
			},
			FlushInterval: -1, // stream blobs as they arrive
		}
		pushURL = target.Scheme + "://" + target.Host
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for the upstream registry: %w", err)
	}
	eh := &egressHandler{next: inner, limit: ratelimit.New(egressBytesPerSec)}
	u := &upstream{
		srv:    &http.Server{Handler: eh, ReadHeaderTimeout: 10 * time.Second},
		ln:     ln,
		egress: eh,
		served: make(chan struct{}),
	}
	if pushURL == "" {
		pushURL = u.URL()
	}
	u.pushURL = pushURL
	go func() {
		defer close(u.served)
		// Serve returns http.ErrServerClosed after Close; any other error
		// shows up as failed pulls.
		_ = u.srv.Serve(ln)
	}()
	return u, nil
}

// URL is the base URL agents, the supernode and direct pulls use.
func (u *upstream) URL() string { return "http://" + u.ln.Addr().String() }

// Host is URL without the scheme.
func (u *upstream) Host() string { return u.ln.Addr().String() }

// Requests returns the requests the registry has had since the last
// ResetRequests, by kind.
func (u *upstream) Requests() RegistryRequests { return u.egress.requests.snapshot() }

// ResetRequests starts counting requests afresh.
func (u *upstream) ResetRequests() { u.egress.requests.reset() }

// EgressBytes is what the registry has written in responses to GET and HEAD.
func (u *upstream) EgressBytes() int64 { return u.egress.bytes.Load() }

// Close stops the server and closes every connection.
func (u *upstream) Close() error {
	err := u.srv.Close()
	<-u.served
	if err != nil {
		return fmt.Errorf("close upstream registry: %w", err)
	}
	return nil
}

// egressHandler counts and rate-limits the response bytes of reads (GET,
// HEAD) with one token bucket shared by all connections: the registry's
// uplink. Pushes are neither counted nor limited.
type egressHandler struct {
	next     http.Handler
	limit    *ratelimit.Limiter // nil = unlimited
	bytes    atomic.Int64
	requests requestCounter
}

func (h *egressHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.requests.count(r)
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.next.ServeHTTP(w, r)
		return
	}
	h.next.ServeHTTP(&egressWriter{ResponseWriter: w, h: h, ctx: r.Context()}, r)
}

// egressWriter paces and counts the body bytes of one response.
type egressWriter struct {
	http.ResponseWriter
	h   *egressHandler
	ctx context.Context
}

// chunk is the largest write that waits for tokens at once; it matches the
// burst of pkg/ratelimit so that concurrent responses interleave fairly.
const chunk = 64 << 10

func (w *egressWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		c := min(len(p), chunk)
		if err := w.h.limit.Wait(w.ctx, c); err != nil {
			return written, fmt.Errorf("registry egress: %w", err)
		}
		n, err := w.ResponseWriter.Write(p[:c])
		written += n
		w.h.bytes.Add(int64(n))
		if err != nil {
			return written, err
		}
		p = p[c:]
	}
	return written, nil
}

// Unwrap lets http.ResponseController reach the underlying writer (Flush).
func (w *egressWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush passes flushes through, for the streaming reverse proxy.
// A failed flush surfaces on the next Write.
func (w *egressWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

// RegistryRequests counts the requests the registry had, by kind (shared
// with e2e/simulate so both report the same fields).
type RegistryRequests = regreq.Counts

type requestCounter struct {
	manifestGet, manifestHead, blobGet, blobHead, other atomic.Int64
}

// count files a request under its kind: /v2/<name>/manifests/<ref> or
// /v2/<name>/blobs/<digest> with GET or HEAD; anything else (the /v2/
// ping, uploads, token requests) is other.
func (c *requestCounter) count(r *http.Request) {
	path := r.URL.Path
	kind := ""
	if strings.HasPrefix(path, "/v2/") {
		if i := strings.LastIndex(path, "/manifests/"); i > len("/v2") {
			kind = "manifest"
		} else if i := strings.LastIndex(path, "/blobs/"); i > len("/v2") && !strings.Contains(path, "/blobs/uploads") {
			kind = "blob"
		}
	}
	switch {
	case kind == "manifest" && r.Method == http.MethodGet:
		c.manifestGet.Add(1)
	case kind == "manifest" && r.Method == http.MethodHead:
		c.manifestHead.Add(1)
	case kind == "blob" && r.Method == http.MethodGet:
		c.blobGet.Add(1)
	case kind == "blob" && r.Method == http.MethodHead:
		c.blobHead.Add(1)
	default:
		c.other.Add(1)
	}
}

func (c *requestCounter) snapshot() RegistryRequests {
	return RegistryRequests{
		ManifestGet: c.manifestGet.Load(), ManifestHead: c.manifestHead.Load(),
		BlobGet: c.blobGet.Load(), BlobHead: c.blobHead.Load(), Other: c.other.Load(),
	}
}

func (c *requestCounter) reset() {
	for _, n := range []*atomic.Int64{&c.manifestGet, &c.manifestHead, &c.blobGet, &c.blobHead, &c.other} {
		n.Store(0)
	}
}
