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
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/agent/blobcache"
	"github.com/starling-oci/starling/agent/manifests"
	"github.com/starling-oci/starling/agent/swarm"
	"github.com/starling-oci/starling/pkg/addrfile"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/httpserve"
	"github.com/starling-oci/starling/pkg/metrics"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/ratelimit"
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
	ScrubRate    config.Bytes    `yaml:"scrub-rate"`
	CacheSize    config.Bytes    `yaml:"cache-size"`
	PieceSize    config.Bytes    `yaml:"piece-size"`
	FetchTimeout config.Duration `yaml:"fetch-timeout"`
	LogLevel     string          `yaml:"log-level"`
	AddrFile     string          `yaml:"addr-file"`
	Prefetch     bool            `yaml:"prefetch"`
	// MetricsListen serves /metrics, /livez and /readyz; empty = off.
	MetricsListen string `yaml:"metrics-listen"`

	// P2P: with no supernode the agent is a plain caching mirror.
	Supernodes   config.Strings  `yaml:"supernode"`
	P2PListen    config.Strings  `yaml:"p2p-listen"`
	Identity     string          `yaml:"identity"`
	SwarmKey     string          `yaml:"swarm-key"`
	PNet         bool            `yaml:"pnet"`
	MaxConns     int             `yaml:"max-conns"`
	UploadRate   config.Bytes    `yaml:"upload-rate"`
	DownloadRate config.Bytes    `yaml:"download-rate"`
	MaxUploads   int             `yaml:"max-uploads"`
	MaxInflight  int             `yaml:"max-inflight"`
	StallTimeout config.Duration `yaml:"stall-timeout"`
}

// DefaultMetricsListen is the agent's metrics address: every interface, so
// that an in-cluster Prometheus and the kubelet's probes reach it.
const DefaultMetricsListen = ":9402"

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen:        "127.0.0.1:5000",
		MetricsListen: DefaultMetricsListen,
		DataDir:       "/var/lib/starling/agent",
		AuthTTL:       config.Duration(5 * time.Minute),
		ScrubRate:     config.Bytes(DefaultScrubRate),
		PieceSize:     config.Bytes(piece.DefaultSize),
		FetchTimeout:  config.Duration(30 * time.Minute),
		LogLevel:      "info",
		Prefetch:      true,
		P2PListen:     config.Strings{Values: []string{"/ip4/0.0.0.0/tcp/4002"}},
		MaxConns:      p2p.DefaultAgentConns,
		MaxUploads:    4,
		MaxInflight:   8,
		StallTimeout:  config.Duration(15 * time.Second),
	}
}

// BindFlags registers the agent's flags on fs, bound to c.
func (c *Config) BindFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "mirror HTTP address (host:port)")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "where blobs and metadata are kept")
	fs.Var(&c.Registries, "registry", "upstream registry to mirror, e.g. https://harbor.example.com, http://127.0.0.1:5055, docker.io (repeatable; the first is the default for clients that send no ?ns=)")
	fs.StringVar(&c.CAFile, "ca-file", c.CAFile, "extra PEM CA bundle trusted for upstream TLS")
	fs.Var(&c.AuthTTL, "auth-ttl", "how long upstream's answer that a client's credentials may read a digest in a repository is reused before it is asked again; negative serves cached content to anyone")
	fs.Var(&c.ScrubRate, "scrub-rate", "re-hash complete blobs in the background at most this many bytes/s, quarantining (and later fetching again) any that fail; 0 = off")
	fs.Var(&c.CacheSize, "cache-size", "disk quota for complete blobs, e.g. 50GiB; least recently used blobs are evicted (0 = no limit)")
	fs.Var(&c.PieceSize, "piece-size", "piece size for blobs fetched from upstream")
	fs.Var(&c.FetchTimeout, "fetch-timeout", "upper bound on one blob fetch")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.BoolVar(&c.Prefetch, "prefetch", c.Prefetch, "start fetching an image's config and layers as soon as its manifest is pulled")
	fs.StringVar(&c.MetricsListen, "metrics-listen", c.MetricsListen, "address of the metrics and health listener (/metrics, /livez, /readyz); empty = none")
	fs.StringVar(&c.AddrFile, "addr-file", c.AddrFile, "write the bound addresses as JSON to this file once listening (for tests and scripts)")
	fs.Var(&c.Supernodes, "supernode", "supernode multiaddr with /p2p/<id> (repeatable; each blob's owner is chosen by rendezvous hashing); none = no P2P")
	fs.Var(&c.P2PListen, "p2p-listen", "libp2p listen multiaddr (repeatable)")
	fs.StringVar(&c.Identity, "identity", c.Identity, "identity key file (created if absent); empty = new identity each start")
	fs.StringVar(&c.SwarmKey, "swarm-key", c.SwarmKey, "pre-shared swarm key file, the same on every node")
	fs.BoolVar(&c.PNet, "pnet", c.PNet, "also encrypt every connection with libp2p pnet (XSalsa20) keyed by the swarm key, so hosts without it cannot even handshake; costs CPU on every byte, and every node must agree")
	fs.IntVar(&c.MaxConns, "max-conns", c.MaxConns, "libp2p connections kept before the least useful are closed (the least useful unprotected ones; configured supernodes are never closed)")
	fs.Var(&c.UploadRate, "upload-rate", "upload cap to peers in bytes/s, e.g. 50MiB (0 = unlimited)")
	fs.Var(&c.DownloadRate, "download-rate", "download cap from peers and upstream in bytes/s (0 = unlimited)")
	fs.IntVar(&c.MaxUploads, "max-uploads", c.MaxUploads, "concurrent piece uploads to peers")
	fs.IntVar(&c.MaxInflight, "max-inflight", c.MaxInflight, "concurrent piece downloads of the agent (each holds one piece in memory)")
	fs.Var(&c.StallTimeout, "stall-timeout", "go back to the upstream registry when, this long, no piece completed, no byte arrived and the swarm reported no progress")
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Registries.Values) == 0 {
		return errors.New("at least one --registry is required")
	}
	if c.DataDir == "" {
		return errors.New("--data-dir is required")
	}
	if ps := int64(c.PieceSize); ps < piece.MinSize || ps > piece.MaxSize {
		return fmt.Errorf("--piece-size %d out of range [%d, %d]", ps, piece.MinSize, piece.MaxSize)
	}
	return nil
}

// Agent is a running agent's parts.
type Agent struct {
	metrics  *metrics.Registry
	checks   []metrics.Check
	store    *store.Store
	cache    *blobcache.Cache
	mux      http.Handler
	host     host.Host // nil without supernodes
	origin   *blobcache.Origin
	swarm    *swarm.Swarm
	cutShort atomic.Int64 // responses in flight when the mirror shut down
	// for CheckConfig
	regs       *upstream.Set
	up         *upstream.Client
	supernodes []string
	log        *zap.Logger
}

// DefaultScrubRate re-hashes a 100 GiB cache about once every 3.5 hours at
// a few percent of one core.
const DefaultScrubRate = 8 << 20

// withdrawTimeout bounds telling the tracker a blob is gone.
const withdrawTimeout = 30 * time.Second

// New builds an agent from its configuration; Close releases it.
func New(cfg Config, log *zap.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	regs, up, err := upstream.Open(cfg.Registries.Values, upstream.Options{CAFile: cfg.CAFile, UserAgent: "starling-agent"}, log.Named("upstream"))
	if err != nil {
		return nil, err
	}
	// A blob the store evicts or quarantines is withdrawn from the swarm,
	// so that peers stop asking this node for it (the swarm exists only
	// once the store does).
	var withdraw atomic.Pointer[swarm.Swarm]
	onRemove := func(digest string) {
		sw := withdraw.Load()
		if sw == nil {
			return
		}
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), withdrawTimeout)
			defer cancel()
			if err := sw.Withdraw(ctx, digest); err != nil {
				log.Debug("withdraw removed blob from the tracker", zap.String("digest", digest), zap.Error(err))
			}
		}()
	}
	st, err := store.Open(store.Options{Dir: cfg.DataDir, QuotaBytes: int64(cfg.CacheSize), OnRemove: onRemove}, log.Named("store"))
	if err != nil {
		return nil, err
	}
	download := ratelimit.New(int64(cfg.DownloadRate))
	origin := &blobcache.Origin{Store: st, Upstream: up, PieceSize: int64(cfg.PieceSize), Download: download, Log: log.Named("origin")}
	a := &Agent{store: st, origin: origin, metrics: metrics.New("agent"), regs: regs, up: up, supernodes: cfg.Supernodes.Values, log: log.Named("check")}
	a.checks = []metrics.Check{{Name: "store", Check: func(context.Context) error { return st.Ready() }}}
	var filler blobcache.Filler = origin
	var source registryproxy.ManifestSource
	if len(cfg.Supernodes.Values) > 0 {
		sw, h, err := newSwarm(cfg, st, origin, download, a.metrics, log)
		if err != nil {
			st.Close()
			return nil, err
		}
		a.host, a.swarm, filler = h, sw, sw
		withdraw.Store(sw)
		source = manifests.New(h, supernodeIDs(cfg.Supernodes.Values), log.Named("manifests"))
		a.checks = append(a.checks, metrics.Check{Name: "supernode", Check: a.supernodeReachable(cfg)})
	}
	a.registerMetrics()
	cache := blobcache.New(st, filler, time.Duration(cfg.FetchTimeout), log.Named("cache"))
	a.cache = cache
	proxy := registryproxy.New(registryproxy.Config{
		Registries: regs, Upstream: up, Manifests: st, Blobs: cache, Source: source,
		AuthTTL: time.Duration(cfg.AuthTTL), Prefetch: cfg.Prefetch, Log: log.Named("proxy"),
	})
	mirror := a.metrics.NewRequests().Middleware(proxy, classifier(regs, st))
	// The node-local copy of the metrics listener's /metrics, for scripts
	// on the node.
	metricsHandler := a.MetricsHandler()
	// Not an http.ServeMux: its own answers (a redirect for /v2 or an
	// uncleaned path, a plain-text 404) are not OCI errors. Every path but
	// these two goes to the proxy, which answers in distribution-spec JSON.
	a.mux = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz":
			_, _ = w.Write([]byte("ok\n"))
		case "/metrics":
			metricsHandler.ServeHTTP(w, r)
		default:
			mirror.ServeHTTP(w, r)
		}
	})
	return a, nil
}

func newSwarm(cfg Config, st *store.Store, origin *blobcache.Origin, download *ratelimit.Limiter, m *metrics.Registry, log *zap.Logger) (*swarm.Swarm, host.Host, error) {
	var supernodes []peer.AddrInfo
	for _, s := range cfg.Supernodes.Values {
		ai, err := p2p.ParsePeerAddr(s)
		if err != nil {
			return nil, nil, fmt.Errorf("--supernode %q: %w", s, err)
		}
		supernodes = append(supernodes, ai)
	}
	h, err := p2p.NewHost(p2p.Config{
		ListenAddrs: cfg.P2PListen.Values, IdentityFile: cfg.Identity, SwarmKeyFile: cfg.SwarmKey,
		PrivateNetwork: cfg.PNet, MaxConns: cfg.MaxConns, Metrics: m.Registerer(),
	}, log.Named("p2p"))
	if err != nil {
		return nil, nil, err
	}
	pieces := pieceserver.NewServer(st, ratelimit.New(int64(cfg.UploadRate)), cfg.MaxUploads, log.Named("pieces"))
	pieces.Register(h)
	pieces.RegisterWatch(h)
	fallbacks := m.NewCounterVec("back_to_source_total",
		"Blobs (or their missing pieces) the agent fetched from the registry because the swarm could not deliver them, by reason.",
		"reason", metrics.FallbackReasons)
	corrupt := m.NewCounter("corrupt_pieces_total", "Pieces received from peers that failed their CID check and were discarded.")
	sw := swarm.New(swarm.Config{
		Supernodes: supernodes, MaxInflight: cfg.MaxInflight, StallTimeout: time.Duration(cfg.StallTimeout), Download: download,
		OnFallback: func(reason string) { fallbacks.WithLabelValues(reason).Inc() },
		OnCorrupt:  corrupt.Inc,
	}, h, st, origin, log.Named("swarm"))
	return sw, h, nil
}

// supernodeIDs returns the peer IDs of --supernode values newSwarm has
// already parsed.
func supernodeIDs(addrs []string) []peer.ID {
	var ids []peer.ID
	for _, s := range addrs {
		if ai, err := p2p.ParsePeerAddr(s); err == nil {
			ids = append(ids, ai.ID)
		}
	}
	return ids
}

// P2PID returns the agent's libp2p peer ID, empty without P2P.
func (a *Agent) P2PID() string {
	if a.host == nil {
		return ""
	}
	return a.host.ID().String()
}

// P2PAddrs returns the agent's dialable libp2p addresses (none without P2P).
func (a *Agent) P2PAddrs() []string {
	if a.host == nil {
		return nil
	}
	return p2p.FullAddrs(a.host)
}

// Stats are the agent's byte counters.
type Stats struct {
	FromUpstream int64 `json:"from_upstream"`
	FromPeers    int64 `json:"from_peers"`
	FromSeed     int64 `json:"from_seed"`
}

// WatchNews returns the bitmaps the agent's downloads got from watched peers.
func (a *Agent) WatchNews() int64 {
	if a.swarm == nil {
		return 0
	}
	return a.swarm.WatchNews()
}

// Stats returns where the agent's blob bytes came from.
func (a *Agent) Stats() Stats {
	s := Stats{FromUpstream: a.origin.BytesFromUpstream()}
	if a.swarm != nil {
		s.FromPeers, s.FromSeed = a.swarm.BytesFromPeers(), a.swarm.BytesFromSeed()
	}
	return s
}

// registerMetrics registers the gauges and counters read from the parts at
// scrape time.
func (a *Agent) registerMetrics() {
	m := a.metrics
	src := map[string]func(Stats) int64{
		"upstream": func(s Stats) int64 { return s.FromUpstream },
		"peers":    func(s Stats) int64 { return s.FromPeers },
		"seed":     func(s Stats) int64 { return s.FromSeed },
	}
	for _, name := range metrics.Sources {
		f := src[name]
		m.CounterFunc("blob_bytes_total", "Blob bytes the agent received, by source: upstream (the registry, back-to-source or no swarm), peers (other agents), seed (supernodes).",
			map[string]string{"source": name}, func() float64 { return float64(f(a.Stats())) })
	}
	m.GaugeFunc("cache_used_bytes", "Bytes of complete blobs in the agent's store.", func() float64 { return float64(a.store.Used()) })
	m.CounterFunc("watch_news_total", "Bitmaps the agent's downloads received from the peers they watch (/starling/watch/1): news of pieces without waiting for a tracker poll.",
		nil, func() float64 { return float64(a.WatchNews()) })
	m.CounterFunc("cache_evictions_total", "Blobs evicted from the store to keep it under --cache-size.", nil, func() float64 { return float64(a.store.Evictions()) })
	m.GaugeFunc("peers_connected", "libp2p peers (agents and supernodes) the agent is connected to.", func() float64 {
		if a.host == nil {
			return 0
		}
		return float64(len(a.host.Network().Peers()))
	})
}

// classifier labels mirror requests for starling_registry_requests_total.
func classifier(regs *upstream.Set, st *store.Store) func(*http.Request) metrics.RequestInfo {
	return func(r *http.Request) metrics.RequestInfo {
		info := metrics.RequestInfo{Registry: "other", Kind: "other", Cache: "none"}
		if reg, ok := regs.Lookup(r.URL.Query().Get("ns")); ok {
			info.Registry = reg.Host
		}
		route, err := registryproxy.ParseRoute(r.URL.Path)
		if err != nil {
			return info
		}
		switch route.Kind {
		case registryproxy.KindBase:
			info.Kind = "base"
		case registryproxy.KindBlob:
			info.Kind, info.Cache = "blob", "miss"
			if st.Has(route.Ref) {
				info.Cache = "hit"
			}
		case registryproxy.KindManifest:
			info.Kind, info.Cache = "manifest", "tag"
			if route.IsDigest() {
				info.Cache = "miss"
				if _, err := st.Manifest(route.Ref); err == nil {
					info.Cache = "hit"
				}
			}
		}
		return info
	}
}

// supernodeReachable is the readiness check of an agent with supernodes:
// at least one of them answers a libp2p connection.
func (a *Agent) supernodeReachable(cfg Config) func(context.Context) error {
	return func(ctx context.Context) error {
		var errs []error
		for _, s := range cfg.Supernodes.Values {
			ai, err := p2p.ParsePeerAddr(s)
			if err != nil {
				return err
			}
			if err := a.host.Connect(ctx, ai); err != nil {
				errs = append(errs, err)
				continue
			}
			return nil
		}
		return fmt.Errorf("no supernode reachable: %w", errors.Join(errs...))
	}
}

// MetricsHandler serves /metrics, /livez and /readyz (the store is open;
// with supernodes configured, one of them is reachable).
func (a *Agent) MetricsHandler() http.Handler { return a.metrics.Handler(a.checks...) }

// Serve serves the mirror on ln until ctx ends: keep-alive connections
// idle for 2 minutes are closed, a response whose client stops reading
// fails after a minute without progress, and the errors net/http sends by
// itself are distribution-spec JSON like every other.
//
// At shutdown, requests get half a second to finish; the rest (blobs
// streaming as they arrive) are ended, and their clients fall back to the
// registry as they do when a mirror fails.
func (a *Agent) Serve(ctx context.Context, ln net.Listener) error {
	return httpserve.ServeWith(ctx, ln, a.Handler(), httpserve.Options{Grace: 500 * time.Millisecond, OCIErrors: true,
		OnShutdown: func(n int) { a.cutShort.Store(int64(n)) }})
}

// Handler is the mirror's HTTP handler.
func (a *Agent) Handler() http.Handler { return a.mux }

// Close stops running fills (their partial blobs stay for a resume) and
// closes the store.
func (a *Agent) Close() error {
	a.cache.Close()
	var err error
	if a.host != nil {
		err = a.host.Close()
	}
	return errors.Join(err, a.store.Close())
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
	var mln net.Listener
	if cfg.MetricsListen != "" {
		if mln, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			ln.Close()
			return fmt.Errorf("metrics listen on %s: %w", cfg.MetricsListen, err)
		}
	}
	addrs := addrfile.Addrs{Mirror: ln.Addr().String(), P2P: a.P2PAddrs()}
	if mln != nil {
		addrs.Metrics = mln.Addr().String()
	}
	log.Info("mirror listening", zap.String("addr", addrs.Mirror), zap.String("metrics", addrs.Metrics), zap.Strings("registries", cfg.Registries.Values),
		zap.Strings("p2p", addrs.P2P), zap.Strings("supernodes", cfg.Supernodes.Values))
	if cfg.AddrFile != "" {
		if err := addrfile.Write(cfg.AddrFile, addrs); err != nil {
			ln.Close()
			if mln != nil {
				mln.Close()
			}
			return err
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { a.CheckConfig(gctx); return nil })
	g.Go(func() error { return a.Serve(gctx, ln) })
	g.Go(func() error { a.store.Scrub(gctx, int64(cfg.ScrubRate)); return nil })
	if mln != nil {
		g.Go(func() error { return httpserve.Serve(gctx, mln, a.MetricsHandler(), time.Second) })
	}
	err = g.Wait()
	// Every handler has returned; the fills still running are cancelled by
	// Close, which records their progress before the store closes.
	fills, cut := a.cache.Running(), a.cutShort.Load()
	if len(fills) == 0 && cut == 0 {
		log.Info("stopped: nothing was in flight", zap.Error(err))
		return err
	}
	log.Info("stopped: interrupted these fills and responses; clients fall back to the registry, partial blobs resume at the next start",
		zap.Strings("interrupted", fills), zap.Int64("responses_cut_short", cut), zap.Error(err))
	return err
}
