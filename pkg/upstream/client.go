package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ocierr"
)

// ErrUnreachable marks a failure to get any answer from the upstream.
var ErrUnreachable = errors.New("upstream unreachable")

// Options configures a Client.
type Options struct {
	// CAFile is an extra PEM bundle trusted for upstream TLS, on top of the
	// system roots (e.g. a Harbor with a private CA).
	CAFile string
	// Keychain supplies credentials when the client sends none. Nil means
	// the docker config.json keychain ($DOCKER_CONFIG or ~/.docker).
	Keychain authn.Keychain
	// UserAgent is sent on every upstream request.
	UserAgent string
}

// Client sends requests to configured upstream registries.
type Client struct {
	base      http.RoundTripper
	keychain  authn.Keychain
	userAgent string
	log       *zap.Logger

	mu         sync.Mutex
	transports map[string]http.RoundTripper // host + "/" + repo -> keychain auth transport
}

// NewClient builds a Client.
func NewClient(opts Options, log *zap.Logger) (*Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if opts.CAFile != "" {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read upstream CA bundle: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream CA bundle %s holds no PEM certificate", opts.CAFile)
		}
		tlsConf.RootCAs = pool
	}
	base := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConf,
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
	}
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	ua := opts.UserAgent
	if ua == "" {
		ua = "starling"
	}
	return &Client{base: base, keychain: kc, userAgent: ua, log: log, transports: map[string]http.RoundTripper{}}, nil
}

// Request is one call to an upstream registry's /v2/<Repo>/<Path>.
type Request struct {
	Registry Registry
	Repo     string
	Method   string
	// Path follows the repository: "manifests/<ref>" or "blobs/<digest>".
	Path string
	// Authorization is the client's own header, forwarded as is. When empty
	// the operator's keychain credentials are used, if any.
	Authorization string
	// Header holds extra request headers such as Accept and Range.
	Header http.Header
}

// Do sends req. A 2xx response is returned for the caller to read and close.
// Any other status becomes an *ocierr.Error carrying the upstream's status,
// challenge and error body; no answer at all wraps ErrUnreachable.
func (c *Client) Do(ctx context.Context, req Request) (*http.Response, error) {
	u := *req.Registry.Endpoint
	u.Path = "/v2/" + req.Repo + "/" + req.Path
	hr, err := http.NewRequestWithContext(ctx, req.Method, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("build upstream request: %w", err)
	}
	for k, vs := range req.Header {
		hr.Header[k] = vs
	}
	hr.Header.Set("User-Agent", c.userAgent)
	rt := c.base
	if req.Authorization != "" {
		hr.Header.Set("Authorization", req.Authorization)
	} else if rt, err = c.keychainTransport(ctx, req.Registry, req.Repo); err != nil {
		return nil, err
	}
	start := time.Now()
	resp, err := (&http.Client{Transport: rt}).Do(hr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s/%s: %w", req.Method, req.Registry.Host, req.Repo, ctx.Err())
		}
		cause := Cause(err)
		c.log.Warn("upstream unreachable", zap.String("method", req.Method), zap.String("registry", req.Registry.Host),
			zap.String("endpoint", req.Registry.Endpoint.String()), zap.String("repo", req.Repo), zap.String("path", req.Path),
			zap.String("cause", cause), zap.String("hint", hint(req.Registry, cause)), zap.String("error", redact(err)),
			zap.Duration("elapsed", time.Since(start)))
		return nil, fmt.Errorf("%s %s/%s/%s: %w: %w", req.Method, req.Registry.Host, req.Repo, req.Path, ErrUnreachable, causeError{cause, redact(err)})
	}
	c.log.Debug("upstream request", zap.String("method", req.Method), zap.String("registry", req.Registry.Host),
		zap.String("repo", req.Repo), zap.String("path", req.Path), zap.Int("status", resp.StatusCode),
		zap.Duration("elapsed", time.Since(start)))
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	oe := ocierr.FromResponse(resp, body)
	if resp.StatusCode >= 500 {
		c.log.Warn("upstream failed", zap.String("method", req.Method), zap.String("registry", req.Registry.Host),
			zap.String("repo", req.Repo), zap.String("path", req.Path), zap.String("cause", Cause(oe)),
			zap.String("message", oe.Message), zap.Duration("elapsed", time.Since(start)))
	}
	return nil, oe
}

// keychainTransport returns a transport that authenticates with the
// operator's credentials for the registry, or anonymously when there are
// none, running the token flow itself.
func (c *Client) keychainTransport(ctx context.Context, reg Registry, repo string) (http.RoundTripper, error) {
	key := reg.Host + "/" + repo
	c.mu.Lock()
	rt, ok := c.transports[key]
	c.mu.Unlock()
	if ok {
		return rt, nil
	}
	opts := []name.Option{}
	if reg.Endpoint.Scheme == "http" {
		opts = append(opts, name.Insecure)
	}
	nreg, err := name.NewRegistry(reg.Endpoint.Host, opts...)
	if err != nil {
		return nil, fmt.Errorf("registry name %s: %w", reg.Host, err)
	}
	auth, err := authn.Resolve(ctx, c.keychain, keychainTarget{reg.Host})
	if err != nil {
		return nil, fmt.Errorf("resolve credentials for %s: %w", reg.Host, err)
	}
	scope := nreg.Repo(repo).Scope(transport.PullScope)
	// go-containerregistry puts its own User-Agent on every request unless
	// the transport it wraps already sets one: keep ours.
	base := transport.NewUserAgent(c.base, c.userAgent)
	if auth == authn.Anonymous {
		// Registries such as Docker Hub want a token even for public
		// repositories: take an anonymous one, as a client would, so public
		// content is read without sending each client through the token
		// flow. A repository it does not open still answers 401 with its
		// challenge, which reaches the client. A registry that cannot be
		// pinged now is asked without, and asked again next time.
		art, aerr := transport.NewWithContext(ctx, nreg, authn.Anonymous, base, []string{scope})
		if aerr != nil {
			c.log.Debug("anonymous token flow unavailable; asking without", zap.String("registry", reg.Host), zap.Error(aerr))
			return c.base, nil
		}
		rt = art
	} else {
		rt, err = transport.NewWithContext(ctx, nreg, auth, base, []string{scope})
		if err != nil {
			return nil, fmt.Errorf("authenticate to %s with configured credentials: %w", reg.Host, err)
		}
	}
	c.mu.Lock()
	c.transports[key] = rt
	c.mu.Unlock()
	return rt, nil
}

// keychainTarget names a registry for the keychain by the host clients use,
// which is how docker config.json keys its entries.
type keychainTarget struct{ host string }

func (k keychainTarget) String() string      { return k.host }
func (k keychainTarget) RegistryStr() string { return k.host }

// redact strips anything after '?' or '@' in URLs of an error message:
// signed redirect URLs carry credentials in their query.
func redact(err error) string {
	var ue interface{ Unwrap() error }
	msg := err.Error()
	if errors.As(err, &ue) {
		msg = ue.Unwrap().Error()
	}
	if i := strings.IndexAny(msg, "?"); i >= 0 {
		msg = msg[:i] + "?<redacted>"
	}
	return msg
}

// IsUnavailable reports whether err means the upstream could not answer
// properly (no connection, or a 5xx), as opposed to a real refusal.
func IsUnavailable(err error) bool {
	if errors.Is(err, ErrUnreachable) {
		return true
	}
	var e *ocierr.Error
	return errors.As(err, &e) && e.Status >= 500
}

// Open parses the configured registries and builds a client for them: the
// start-up both the agent and the supernode need.
func Open(registries []string, opts Options, log *zap.Logger) (*Set, *Client, error) {
	regs, err := NewSet(registries)
	if err != nil {
		return nil, nil, err
	}
	c, err := NewClient(opts, log)
	if err != nil {
		return nil, nil, err
	}
	return regs, c, nil
}
