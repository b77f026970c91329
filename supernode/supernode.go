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
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/starling-oci/starling/pkg/access"
	"github.com/starling-oci/starling/pkg/addrfile"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/httpserve"
	"github.com/starling-oci/starling/pkg/metrics"
	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/upstream"
	"github.com/starling-oci/starling/supernode/manifests"
	"github.com/starling-oci/starling/supernode/preheat"
	"github.com/starling-oci/starling/supernode/seed"
	"github.com/starling-oci/starling/supernode/tracker"
)

// Config is the supernode's configuration; each field is a flag and a YAML key.
type Config struct {
	P2PListen    config.Strings  `yaml:"p2p-listen"`
	Identity     string          `yaml:"identity"`
	SwarmKey     string          `yaml:"swarm-key"`
	PNet         bool            `yaml:"pnet"`
	MaxConns     int             `yaml:"max-conns"`
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
	ScrubRate    config.Bytes    `yaml:"scrub-rate"`
	LogLevel     string          `yaml:"log-level"`
	AddrFile     string          `yaml:"addr-file"`
	HTTPListen   string          `yaml:"http-listen"`
	// MetricsListen serves /metrics, /livez and /readyz; empty = off.
	MetricsListen string `yaml:"metrics-listen"`
	// Preheat (served on HTTPListen).
	Supernodes       config.Strings `yaml:"supernode"`
	PreheatTokenFile string         `yaml:"preheat-token-file"`
	PreheatBasicFile string         `yaml:"preheat-basic-auth-file"`
	PreheatPlatforms config.Strings `yaml:"preheat-platform"`
}

// DefaultMetricsListen is the supernode's metrics address (a port apart
// from the agent's, so both run on one host).
const DefaultMetricsListen = ":9403"

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		P2PListen:        config.Strings{Values: []string{"/ip4/0.0.0.0/tcp/4001"}},
		DataDir:          "/var/lib/starling/supernode",
		MaxConns:         p2p.SupernodeConns,
		MaxUploads:       8,
		PieceSize:        config.Bytes(piece.DefaultSize),
		FetchTimeout:     config.Duration(30 * time.Minute),
		TagTTL:           config.Duration(time.Second),
		AuthTTL:          config.Duration(5 * time.Minute),
		ScrubRate:        config.Bytes(8 << 20),
		LogLevel:         "info",
		MetricsListen:    DefaultMetricsListen,
		PreheatPlatforms: config.Strings{Values: []string{"linux/amd64"}},
	}
}

// BindFlags registers the supernode's flags on fs, bound to c.
func (c *Config) BindFlags(fs *flag.FlagSet) {
	fs.Var(&c.P2PListen, "p2p-listen", "libp2p listen multiaddr (repeatable)")
	fs.StringVar(&c.Identity, "identity", c.Identity, "identity key file (created if absent); pin its peer ID in agents' --supernode")
	fs.StringVar(&c.SwarmKey, "swarm-key", c.SwarmKey, "pre-shared swarm key file (starling swarm-key); without it the swarm is open to anyone")
	fs.BoolVar(&c.PNet, "pnet", c.PNet, "also encrypt every connection with libp2p pnet (XSalsa20) keyed by the swarm key, so hosts without it cannot even handshake; costs CPU on every byte, and every node must agree")
	fs.IntVar(&c.MaxConns, "max-conns", c.MaxConns, "libp2p connections kept before the least useful are closed (one per agent of the cluster)")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "where seeded blobs and metadata are kept")
	fs.Var(&c.Registries, "registry", "upstream registry the seed may fetch from (repeatable)")
	fs.StringVar(&c.CAFile, "ca-file", c.CAFile, "extra PEM CA bundle trusted for upstream TLS")
	fs.Var(&c.UploadRate, "upload-rate", "upload cap in bytes/s, e.g. 100MiB (0 = unlimited)")
	fs.IntVar(&c.MaxUploads, "max-uploads", c.MaxUploads, "concurrent piece uploads")
	fs.Var(&c.PieceSize, "piece-size", "piece size for new blobs")
	fs.Var(&c.CacheSize, "cache-size", "disk quota for seeded blobs (0 = no limit)")
	fs.Var(&c.FetchTimeout, "fetch-timeout", "upper bound on one upstream blob fetch")
	fs.Var(&c.TagTTL, "tag-ttl", "how long a tag's resolution upstream answers every agent (0 = each request goes upstream)")
	fs.Var(&c.ScrubRate, "scrub-rate", "re-hash seeded blobs in the background at most this many bytes/s, dropping any that fail (seeded again on the next poll); 0 = off")
	fs.Var(&c.AuthTTL, "auth-ttl", "how long upstream's answer that a client's credentials may read a manifest or blob in a repository is reused before it is asked again")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.AddrFile, "addr-file", c.AddrFile, "write the dialable addresses as JSON to this file once listening")
	fs.StringVar(&c.HTTPListen, "http-listen", c.HTTPListen, "address of the HTTP status server (/healthz, /metrics, /status); empty = none")
	fs.Var(&c.Supernodes, "supernode", "every supernode's multiaddr with /p2p/<id>, as the agents have them (repeatable; this one's may be listed): preheated blobs go to their owner by rendezvous; none = this supernode seeds all it is asked to preheat")
	fs.StringVar(&c.PreheatTokenFile, "preheat-token-file", c.PreheatTokenFile, "file holding the bearer token the preheat API requires (Harbor: auth mode OAuth/token)")
	fs.StringVar(&c.PreheatBasicFile, "preheat-basic-auth-file", c.PreheatBasicFile, "file holding user:password for the preheat API's basic auth (Harbor: auth mode Basic)")
	fs.Var(&c.PreheatPlatforms, "preheat-platform", "os/arch[/variant] preheated from an image index (repeatable)")
	fs.StringVar(&c.MetricsListen, "metrics-listen", c.MetricsListen, "address of the metrics and health listener (/metrics, /livez, /readyz); empty = none")
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
	metrics   *metrics.Registry
	host      host.Host
	store     *store.Store
	tracker   *tracker.Tracker
	seed      *seed.Seed
	pieces    *pieceserver.Server
	manifests *manifests.Service
	preheat   *preheat.Service
	// for CheckConfig
	regs *upstream.Set
	up   *upstream.Client
	log  *zap.Logger
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
	// A blob the store evicts or quarantines stops being seeded from here
	// (the tracker exists only once the store does).
	var seedGone atomic.Pointer[tracker.Tracker]
	onRemove := func(digest string) {
		if tr := seedGone.Load(); tr != nil {
			tr.SeedGone(digest)
		}
	}
	st, err := store.Open(store.Options{Dir: cfg.DataDir, QuotaBytes: int64(cfg.CacheSize), OnRemove: onRemove}, log.Named("store"))
	if err != nil {
		return nil, err
	}
	if cfg.Identity == "" {
		log.Warn("NO --identity: this supernode gets a NEW PEER ID on every start, and every agent's --supernode .../p2p/<id> " +
			"stops matching at the next restart (agents then pull from the registry directly). " +
			"Create one with `starling id FILE` and pass --identity FILE")
	}
	m := metrics.New("supernode")
	h, err := p2p.NewHost(p2p.Config{
		ListenAddrs: cfg.P2PListen.Values, IdentityFile: cfg.Identity, SwarmKeyFile: cfg.SwarmKey,
		PrivateNetwork: cfg.PNet, MaxConns: cfg.MaxConns, Metrics: m.Registerer(),
	}, log.Named("p2p"))
	if err != nil {
		st.Close()
		return nil, err
	}
	tr := tracker.New(tracker.Config{}, h, log.Named("tracker"))
	seedGone.Store(tr)
	acc := access.New(up, time.Duration(cfg.AuthTTL), nil)
	tr.SetAuthorizer(authorizer(regs, acc))
	sd := seed.New(st, up, regs, tr, int64(cfg.PieceSize), time.Duration(cfg.FetchTimeout), log.Named("seed"))
	tr.SetSeeder(sd)
	tr.Register()
	ps := pieceserver.NewServer(st, ratelimit.New(int64(cfg.UploadRate)), cfg.MaxUploads, log.Named("pieces"))
	ps.Register(h)
	// A manifest the manifest service got for some credentials grants them
	// the blobs it names, so the tracker's check of each poll needs no HEAD.
	mf := manifests.New(manifests.Config{TagTTL: time.Duration(cfg.TagTTL), AuthTTL: time.Duration(cfg.AuthTTL), OnGrant: acc.AllowManifest},
		regs, up, st, log.Named("manifests"))
	mf.Register(h)
	ph, err := newPreheat(cfg, h, regs, up, sd, log.Named("preheat"))
	if err != nil {
		sd.Close()
		h.Close()
		st.Close()
		return nil, err
	}
	s := &Supernode{metrics: m, host: h, store: st, tracker: tr, seed: sd, pieces: ps, manifests: mf, preheat: ph, regs: regs, up: up, log: log.Named("check")}
	s.registerMetrics()
	return s, nil
}

// newPreheat builds the preheat API: credentials from their files, the
// supernode set for routing blobs to their owners.
func newPreheat(cfg Config, h host.Host, regs *upstream.Set, up *upstream.Client, sd *seed.Seed, log *zap.Logger) (*preheat.Service, error) {
	pc := preheat.Config{Registries: regs, Upstream: up, Seed: sd, Host: h, Platforms: cfg.PreheatPlatforms.Values, Log: log}
	if cfg.PreheatTokenFile != "" {
		b, err := os.ReadFile(cfg.PreheatTokenFile)
		if err != nil {
			return nil, fmt.Errorf("--preheat-token-file: %w", err)
		}
		if pc.Token = strings.TrimSpace(string(b)); pc.Token == "" {
			return nil, fmt.Errorf("--preheat-token-file %s is empty", cfg.PreheatTokenFile)
		}
	}
	if cfg.PreheatBasicFile != "" {
		b, err := os.ReadFile(cfg.PreheatBasicFile)
		if err != nil {
			return nil, fmt.Errorf("--preheat-basic-auth-file: %w", err)
		}
		var ok bool
		if pc.User, pc.Password, ok = strings.Cut(strings.TrimSpace(string(b)), ":"); !ok || pc.User == "" || pc.Password == "" {
			return nil, fmt.Errorf("--preheat-basic-auth-file %s: want user:password", cfg.PreheatBasicFile)
		}
	}
	if cfg.HTTPListen != "" && pc.Token == "" && pc.User == "" {
		log.Warn("the preheat API on --http-listen has no --preheat-token-file or --preheat-basic-auth-file: anyone who reaches it can make this supernode fetch images")
	}
	self := false
	for _, a := range cfg.Supernodes.Values {
		ai, err := p2p.ParsePeerAddr(a)
		if err != nil {
			return nil, fmt.Errorf("--supernode %q: %w", a, err)
		}
		if ai.ID == h.ID() {
			self = true
		} else {
			h.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.PermanentAddrTTL)
		}
		pc.Supernodes = append(pc.Supernodes, ai.ID)
	}
	if len(pc.Supernodes) > 0 && !self {
		pc.Supernodes = append(pc.Supernodes, h.ID())
	}
	ph := preheat.New(pc)
	ph.Register()
	return ph, nil
}

// registerMetrics registers the values read from the parts at scrape time.
func (s *Supernode) registerMetrics() {
	m := s.metrics
	m.CounterFunc("seed_fetches_total", "Blob fetches from the upstream registry the seed started (one per blob this supernode owns, while it keeps it).", nil,
		func() float64 { return float64(s.SeedFetches()) })
	m.CounterFunc("seed_upstream_bytes_total", "Blob bytes the seed read from upstream registries (the supernode's share of registry egress).", nil,
		func() float64 { return float64(s.seed.BytesFromUpstream()) })
	for _, method := range []string{"GET", "HEAD"} {
		m.CounterFunc("manifest_upstream_requests_total", "Manifest requests the supernode sent upstream for agents (GETs are what Docker Hub counts as pulls; HEADs resolve tags and check credentials).",
			prometheus.Labels{"method": method}, func() float64 {
				st := s.manifests.Stats()
				if method == "GET" {
					return float64(st.UpstreamGETs)
				}
				return float64(st.UpstreamHEADs)
			})
	}
	m.CounterFunc("manifest_stale_answers_total", "Tags and manifests answered from the supernode's last resolution while upstream was unavailable.", nil,
		func() float64 { return float64(s.manifests.Stats().StaleAnswers) })
	m.CounterFunc("piece_bytes_served_total", "Piece bytes uploaded to agents.", nil, func() float64 { return float64(s.BytesServed()) })
	for _, result := range []string{"ok", "failed", "invalid", "unauthorized", "busy", "forwarded"} {
		m.CounterFunc("preheat_requests_total", "Preheat requests by result: ok and failed (manifests this supernode handled), invalid, unauthorized and busy (refused notifications), forwarded (blob lists another supernode handed to this one).",
			map[string]string{"result": result}, func() float64 { r, _ := s.preheat.Counts(); return float64(r[result]) })
	}
	m.CounterFunc("preheat_blobs_total", "Blobs preheat handed to their owning supernode's seed.", nil,
		func() float64 { _, n := s.preheat.Counts(); return float64(n) })
	m.GaugeFunc("tracked_blobs", "Blobs the tracker holds swarms for.", func() float64 { return float64(len(s.tracker.Status())) })
	m.GaugeFunc("cache_used_bytes", "Bytes of complete blobs in the supernode's store.", func() float64 { return float64(s.store.Used()) })
	m.CounterFunc("cache_evictions_total", "Blobs evicted from the store to keep it under --cache-size.", nil, func() float64 { return float64(s.store.Evictions()) })
	m.GaugeFunc("peers_connected", "libp2p peers (agents and other supernodes) connected to the supernode.", func() float64 { return float64(len(s.host.Network().Peers())) })
}

// MetricsHandler serves /metrics, /livez and /readyz (the store is open).
func (s *Supernode) MetricsHandler() http.Handler {
	return s.metrics.Handler(metrics.Check{Name: "store", Check: func(context.Context) error { return s.store.Ready() }})
}

// authorizer gives a piece table (and starts the seed) only to a poll
// whose forwarded credentials upstream lets read that digest in that
// repository, as the agents' mirror does for its clients (invariant 6).
func authorizer(regs *upstream.Set, acc *access.Checker) tracker.Authorizer {
	return func(ctx context.Context, registry, repo, digest, authorization string) error {
		reg, ok := regs.Lookup(registry)
		if !ok {
			return ocierr.New(http.StatusForbidden, ocierr.Denied, "registry %q is not mirrored by this supernode", registry)
		}
		return acc.Check(ctx, reg, repo, access.Blob, digest, authorization)
	}
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
	mux.Handle("/metrics", s.MetricsHandler())
	// Harbor's Kraken preheat driver and registry notifications.
	mux.Handle("/health", s.preheat.Handler())
	mux.Handle("/registry/notifications", s.preheat.Handler())
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"peer_id": s.host.ID().String(), "addrs": s.Addrs(), "blobs": s.tracker.Status()})
	})
	return mux
}

// Close stops the supernode.
func (s *Supernode) Close() error {
	s.preheat.Close()
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
	addrs := addrfile.Addrs{P2P: s.Addrs()}
	type server struct {
		ln net.Listener
		h  http.Handler
	}
	var servers []server
	closeAll := func() {
		for _, sv := range servers {
			sv.ln.Close()
		}
	}
	for _, l := range []struct {
		addr  string
		field *string
		h     http.Handler
	}{{cfg.HTTPListen, &addrs.HTTP, s.Handler()}, {cfg.MetricsListen, &addrs.Metrics, s.MetricsHandler()}} {
		if l.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("listen on %s: %w", l.addr, err)
		}
		*l.field = ln.Addr().String()
		servers = append(servers, server{ln, l.h})
	}
	log.Info("supernode listening", zap.String("peer_id", s.host.ID().String()), zap.Strings("addrs", addrs.P2P),
		zap.String("http", addrs.HTTP), zap.String("metrics", addrs.Metrics), zap.Strings("registries", cfg.Registries.Values))
	if cfg.AddrFile != "" {
		if err := addrfile.Write(cfg.AddrFile, addrs); err != nil {
			closeAll()
			return err
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { <-gctx.Done(); return nil })
	g.Go(func() error { s.CheckConfig(gctx); return nil })
	g.Go(func() error { s.store.Scrub(gctx, int64(cfg.ScrubRate)); return nil })
	for _, sv := range servers {
		g.Go(func() error { return httpserve.Serve(gctx, sv.ln, sv.h, 5*time.Second) })
	}
	return g.Wait()
}

// CheckConfig checks each configured registry once and logs what it found
// (reachable, TLS or plain, auth required) at info, or at warn what is
// wrong and what to change.
func (s *Supernode) CheckConfig(ctx context.Context) {
	var wg sync.WaitGroup
	for _, reg := range s.regs.All() {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			upstream.LogFinding(s.log, s.up.Check(cctx, reg))
		})
	}
	wg.Wait()
}
