// Package supernode runs Starling's tracker and seed: it knows which peer
// has which pieces of every blob, fetches each blob from upstream once,
// cuts it into CID-addressed pieces and serves them like any peer.
package supernode

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/addrfile"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/httpserve"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/upstream"
	"github.com/starling-oci/starling/supernode/manifests"
	"github.com/starling-oci/starling/supernode/seed"
	"github.com/starling-oci/starling/supernode/tracker"
)

// Config is the supernode's configuration; each field is a flag and a YAML key.
type Config struct {
	P2PListen    config.Strings  `yaml:"p2p-listen"`
	Identity     string          `yaml:"identity"`
	SwarmKey     string          `yaml:"swarm-key"`
	DataDir      string          `yaml:"data-dir"`
	Registries   config.Strings  `yaml:"registry"`
	CAFile       string          `yaml:"ca-file"`
	UploadRate   config.Bytes    `yaml:"upload-rate"`
	MaxUploads   int             `yaml:"max-uploads"`
	PieceSize    config.Bytes    `yaml:"piece-size"`
	CacheSize    config.Bytes    `yaml:"cache-size"`
	FetchTimeout config.Duration `yaml:"fetch-timeout"`
	TagTTL       config.Duration `yaml:"tag-ttl"`
	AuthTTL      config.Duration `yaml:"auth-ttl"`
	LogLevel     string          `yaml:"log-level"`
	AddrFile     string          `yaml:"addr-file"`
	HTTPListen   string          `yaml:"http-listen"`
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		P2PListen:    config.Strings{Values: []string{"/ip4/0.0.0.0/tcp/4001"}},
		DataDir:      "/var/lib/starling/supernode",
		MaxUploads:   8,
		PieceSize:    config.Bytes(piece.DefaultSize),
		FetchTimeout: config.Duration(30 * time.Minute),
		TagTTL:       config.Duration(time.Second),
		AuthTTL:      config.Duration(5 * time.Minute),
		LogLevel:     "info",
	}
}

// BindFlags registers the supernode's flags on fs, bound to c.
func (c *Config) BindFlags(fs *flag.FlagSet) {
	fs.Var(&c.P2PListen, "p2p-listen", "libp2p listen multiaddr (repeatable)")
	fs.StringVar(&c.Identity, "identity", c.Identity, "identity key file (created if absent); pin its peer ID in agents' --supernode")
	fs.StringVar(&c.SwarmKey, "swarm-key", c.SwarmKey, "pre-shared swarm key file (starling swarm-key); without it the swarm is open to anyone")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "where seeded blobs and metadata are kept")
	fs.Var(&c.Registries, "registry", "upstream registry the seed may fetch from (repeatable)")
	fs.StringVar(&c.CAFile, "ca-file", c.CAFile, "extra PEM CA bundle trusted for upstream TLS")
	fs.Var(&c.UploadRate, "upload-rate", "upload cap in bytes/s, e.g. 100MiB (0 = unlimited)")
	fs.IntVar(&c.MaxUploads, "max-uploads", c.MaxUploads, "concurrent piece uploads")
	fs.Var(&c.PieceSize, "piece-size", "piece size for new blobs")
	fs.Var(&c.CacheSize, "cache-size", "disk quota for seeded blobs (0 = no limit)")
	fs.Var(&c.FetchTimeout, "fetch-timeout", "upper bound on one upstream blob fetch")
	fs.Var(&c.TagTTL, "tag-ttl", "how long a tag's resolution upstream answers every agent (0 = each request goes upstream)")
	fs.Var(&c.AuthTTL, "auth-ttl", "how long upstream's answer to a client's credentials for a manifest is reused before they are checked again")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.AddrFile, "addr-file", c.AddrFile, "write the dialable addresses as JSON to this file once listening")
	fs.StringVar(&c.HTTPListen, "http-listen", c.HTTPListen, "address of the HTTP status server (/healthz, /metrics, /status); empty = none")
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Registries.Values) == 0 {
		return errors.New("at least one --registry is required")
	}
	if c.DataDir == "" {
		return errors.New("--data-dir is required")
	}
	if c.TagTTL < 0 || c.AuthTTL < 0 {
		return errors.New("--tag-ttl and --auth-ttl must not be negative")
	}
	if ps := int64(c.PieceSize); ps < piece.MinSize || ps > piece.MaxSize {
		return fmt.Errorf("--piece-size %d out of range [%d, %d]", ps, piece.MinSize, piece.MaxSize)
	}
	return nil
}

// Supernode is a running supernode.
type Supernode struct {
	host    host.Host
	store   *store.Store
	tracker *tracker.Tracker
	seed    *seed.Seed
	pieces  *pieceserver.Server
}

// New starts a supernode's libp2p host and services.
func New(cfg Config, log *zap.Logger) (*Supernode, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	regs, up, err := upstream.Open(cfg.Registries.Values, upstream.Options{CAFile: cfg.CAFile, UserAgent: "starling-supernode"}, log.Named("upstream"))
	if err != nil {
		return nil, err
	}
	st, err := store.Open(store.Options{Dir: cfg.DataDir, QuotaBytes: int64(cfg.CacheSize)}, log.Named("store"))
	if err != nil {
		return nil, err
	}
	h, err := p2p.NewHost(p2p.Config{ListenAddrs: cfg.P2PListen.Values, IdentityFile: cfg.Identity, SwarmKeyFile: cfg.SwarmKey}, log.Named("p2p"))
	if err != nil {
		st.Close()
		return nil, err
	}
	tr := tracker.New(tracker.Config{}, h, log.Named("tracker"))
	sd := seed.New(st, up, regs, tr, int64(cfg.PieceSize), time.Duration(cfg.FetchTimeout), log.Named("seed"))
	tr.SetSeeder(sd)
	tr.Register()
	ps := pieceserver.NewServer(st, ratelimit.New(int64(cfg.UploadRate)), cfg.MaxUploads, log.Named("pieces"))
	ps.Register(h)
	manifests.New(manifests.Config{TagTTL: time.Duration(cfg.TagTTL), AuthTTL: time.Duration(cfg.AuthTTL)},
		regs, up, st, log.Named("manifests")).Register(h)
	return &Supernode{host: h, store: st, tracker: tr, seed: sd, pieces: ps}, nil
}

// Host is the supernode's libp2p host.
func (s *Supernode) Host() host.Host { return s.host }

// Addrs are the dialable multiaddrs with /p2p/<id>, for agents' --supernode.
func (s *Supernode) Addrs() []string { return p2p.FullAddrs(s.host) }

// SeedFetches counts upstream fetches the seed started.
func (s *Supernode) SeedFetches() int { return s.seed.Fetches() }

// BytesServed counts piece bytes uploaded to agents.
func (s *Supernode) BytesServed() int64 { return s.pieces.BytesServed() }

// Handler serves /healthz, /metrics (Prometheus text) and /status (JSON:
// the blobs the tracker knows).
func (s *Supernode) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintf(w, "# TYPE starling_seed_fetches_total counter\nstarling_seed_fetches_total %d\n", s.SeedFetches())
		fmt.Fprintf(w, "# TYPE starling_piece_bytes_served_total counter\nstarling_piece_bytes_served_total %d\n", s.BytesServed())
		fmt.Fprintf(w, "# TYPE starling_tracked_blobs gauge\nstarling_tracked_blobs %d\n", len(s.tracker.Status()))
		fmt.Fprintf(w, "# TYPE starling_cache_used_bytes gauge\nstarling_cache_used_bytes %d\n", s.store.Used())
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"peer_id": s.host.ID().String(), "addrs": s.Addrs(), "blobs": s.tracker.Status()})
	})
	return mux
}

// Close stops the supernode.
func (s *Supernode) Close() error {
	s.seed.Close()
	err := s.host.Close()
	return errors.Join(err, s.store.Close())
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, log *zap.Logger) error {
	s, err := New(cfg, log)
	if err != nil {
		return err
	}
	defer s.Close()
	addrs := s.Addrs()
	log.Info("supernode listening", zap.String("peer_id", s.host.ID().String()), zap.Strings("addrs", addrs),
		zap.Strings("registries", cfg.Registries.Values))
	if cfg.AddrFile != "" {
		if err := addrfile.Write(cfg.AddrFile, addrfile.Addrs{P2P: addrs}); err != nil {
			return err
		}
	}
	if cfg.HTTPListen == "" {
		<-ctx.Done()
		return nil
	}
	ln, err := net.Listen("tcp", cfg.HTTPListen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.HTTPListen, err)
	}
	log.Info("status server listening", zap.String("addr", ln.Addr().String()))
	return httpserve.Serve(ctx, ln, s.Handler(), 5*time.Second)
}
