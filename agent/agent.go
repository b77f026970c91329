// Package agent runs one node's Starling agent: the registry mirror that
// containerd, CRI-O and Docker pull through, backed by the local store.
package agent

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/starling-oci/starling/agent/blobcache"
	"github.com/starling-oci/starling/pkg/addrfile"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/upstream"
	"github.com/starling-oci/starling/registryproxy"
)

// Config is the agent's configuration; each field is a flag and a YAML key.
type Config struct {
	Listen       string          `yaml:"listen"`
	DataDir      string          `yaml:"data-dir"`
	Registries   config.Strings  `yaml:"registry"`
	CAFile       string          `yaml:"ca-file"`
	AuthTTL      config.Duration `yaml:"auth-ttl"`
	CacheSize    config.Bytes    `yaml:"cache-size"`
	PieceSize    config.Bytes    `yaml:"piece-size"`
	FetchTimeout config.Duration `yaml:"fetch-timeout"`
	LogLevel     string          `yaml:"log-level"`
	AddrFile     string          `yaml:"addr-file"`
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen:       "127.0.0.1:5000",
		DataDir:      "/var/lib/starling/agent",
		AuthTTL:      config.Duration(5 * time.Minute),
		PieceSize:    config.Bytes(piece.DefaultSize),
		FetchTimeout: config.Duration(30 * time.Minute),
		LogLevel:     "info",
	}
}

// BindFlags registers the agent's flags on fs, bound to c.
func (c *Config) BindFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "mirror HTTP address (host:port)")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "where blobs and metadata are kept")
	fs.Var(&c.Registries, "registry", "upstream registry to mirror, e.g. https://harbor.example.com, http://127.0.0.1:5055, docker.io (repeatable; the first is the default for clients that send no ?ns=)")
	fs.StringVar(&c.CAFile, "ca-file", c.CAFile, "extra PEM CA bundle trusted for upstream TLS")
	fs.Var(&c.AuthTTL, "auth-ttl", "how long upstream's answer to a client's credentials is reused before cached content is served to it again; negative serves cached content to anyone")
	fs.Var(&c.CacheSize, "cache-size", "disk quota for complete blobs, e.g. 50GiB; least recently used blobs are evicted (0 = no limit)")
	fs.Var(&c.PieceSize, "piece-size", "piece size for blobs fetched from upstream")
	fs.Var(&c.FetchTimeout, "fetch-timeout", "upper bound on one blob fetch")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.AddrFile, "addr-file", c.AddrFile, "write the bound addresses as JSON to this file once listening (for tests and scripts)")
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Registries.Values) == 0 {
		return errors.New("at least one --registry is required")
	}
	if c.DataDir == "" {
		return errors.New("--data-dir is required")
	}
	if ps := int64(c.PieceSize); ps < 64<<10 || ps > 64<<20 {
		return fmt.Errorf("--piece-size %d out of range [64KiB, 64MiB]", ps)
	}
	return nil
}

// Agent is a running agent's parts.
type Agent struct {
	store *store.Store
	cache *blobcache.Cache
	mux   *http.ServeMux
}

// New builds an agent from its configuration; Close releases it.
func New(cfg Config, log *zap.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	regs, err := upstream.NewSet(cfg.Registries.Values)
	if err != nil {
		return nil, err
	}
	up, err := upstream.NewClient(upstream.Options{CAFile: cfg.CAFile, UserAgent: "starling-agent"}, log.Named("upstream"))
	if err != nil {
		return nil, err
	}
	st, err := store.Open(store.Options{Dir: cfg.DataDir, QuotaBytes: int64(cfg.CacheSize)}, log.Named("store"))
	if err != nil {
		return nil, err
	}
	origin := &blobcache.Origin{Store: st, Upstream: up, PieceSize: int64(cfg.PieceSize), Log: log.Named("origin")}
	cache := blobcache.New(st, origin, time.Duration(cfg.FetchTimeout), log.Named("cache"))
	proxy := registryproxy.New(registryproxy.Config{
		Registries: regs, Upstream: up, Manifests: st, Blobs: cache,
		AuthTTL: time.Duration(cfg.AuthTTL), Log: log.Named("proxy"),
	})
	mux := http.NewServeMux()
	mux.Handle("/v2/", proxy)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	return &Agent{store: st, cache: cache, mux: mux}, nil
}

// Handler is the mirror's HTTP handler.
func (a *Agent) Handler() http.Handler { return a.mux }

// Close stops running fills (their partial blobs stay for a resume) and
// closes the store.
func (a *Agent) Close() error {
	a.cache.Close()
	return a.store.Close()
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, log *zap.Logger) error {
	a, err := New(cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	log.Info("mirror listening", zap.String("addr", ln.Addr().String()), zap.Strings("registries", cfg.Registries.Values))
	if cfg.AddrFile != "" {
		if err := addrfile.Write(cfg.AddrFile, addrfile.Addrs{Mirror: ln.Addr().String()}); err != nil {
			ln.Close()
			return err
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve mirror: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return srv.Shutdown(shutdownCtx)
	})
	return g.Wait()
}
