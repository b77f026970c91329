// Package p2p sets up the libp2p host shared by the agent and the supernode:
// TCP (and QUIC on open networks), TLS 1.3, yamux, a membership proof from a
// pre-shared swarm key (optionally libp2p's pnet beneath everything), a
// persistent Ed25519 identity, and connection limits set for the role.
package p2p

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Config selects addresses, key files and limits for NewHost. The zero value
// gives an ephemeral identity on an open network listening on loopback.
type Config struct {
	// ListenAddrs are multiaddrs to listen on. Empty means
	// /ip4/127.0.0.1/tcp/0 and, without a swarm key, /ip4/127.0.0.1/udp/0/quic-v1.
	// A TCP port is bound exclusively: a port another process (another
	// agent) listens on is an error, not a shared port.
	ListenAddrs []string
	// IdentityFile holds the host's private key; it is created if absent.
	// Empty means a new identity on every start.
	IdentityFile string
	// SwarmKeyFile holds the swarm's pre-shared key. With it, every
	// connection is TLS 1.3 followed by a membership proof derived from the
	// key, checked before any protocol runs. Empty means an open network,
	// fit only for development.
	SwarmKeyFile string
	// PrivateNetwork also runs libp2p's pnet (XSalsa20 keyed by the swarm
	// key) beneath TLS, so that a host without the key cannot even complete
	// a handshake or learn a peer ID. It costs a second cipher on every
	// byte; see docs/ARCHITECTURE.md. Requires SwarmKeyFile.
	PrivateNetwork bool
	// MaxConns is how many connections the host keeps: above it the
	// connection manager closes the unprotected ones idle longest, down to
	// 7/8 of it, and the resource manager admits up to 5/4 of it. Zero means
	// DefaultAgentConns; supernodes use SupernodeConns.
	MaxConns int
	// DNS resolves /dns4, /dns6 and /dns addresses at each dial. Nil means
	// the system resolver.
	DNS network.MultiaddrDNSResolver
	// ConnGrace is how long a new connection is safe from trimming. Zero
	// means one minute.
	ConnGrace time.Duration
	// Metrics receives libp2p's own Prometheus metrics (connections,
	// streams, resource manager, ...). Nil turns them off rather than
	// letting libp2p use the global default registerer.
	Metrics prometheus.Registerer
}

// Connection budgets by role.
const (
	// DefaultAgentConns: an agent talks to its supernodes and the peers the
	// tracker hands out (tens at a time).
	DefaultAgentConns = 192
	// SupernodeConns: a supernode keeps a connection to every agent of the
	// cluster (tracker polls, seed pieces), for clusters of 10,000+ nodes.
	SupernodeConns = 12000
)

const (
	defaultTCPAddr  = "/ip4/127.0.0.1/tcp/0"
	defaultQUICAddr = "/ip4/127.0.0.1/udp/0/quic-v1"
)

// NewHost starts a libp2p host for cfg. The caller owns it and must Close it.
//
// With a swarm key only TCP is enabled: the membership proof runs in the TCP
// upgrade's security step, which go-libp2p's QUIC transport does not have
// (it runs its own TLS), and QUIC refuses pnet ("QUIC doesn't support private
// networks yet"). A QUIC listen address combined with a swarm key is
// therefore a configuration error rather than silently ignored.
func NewHost(cfg Config, log *zap.Logger) (host.Host, error) {
	if log == nil {
		log = zap.NewNop()
	}
	var (
		key crypto.PrivKey
		err error
	)
	if cfg.IdentityFile != "" {
		key, err = LoadOrCreateIdentity(cfg.IdentityFile)
		warnIfReadable(log, cfg.IdentityFile, "identity")
	} else {
		key, _, err = crypto.GenerateEd25519Key(rand.Reader)
	}
	if err != nil {
		return nil, fmt.Errorf("new host: identity: %w", err)
	}
	var psk pnet.PSK
	if cfg.SwarmKeyFile != "" {
		if psk, err = LoadSwarmKey(cfg.SwarmKeyFile); err != nil {
			return nil, fmt.Errorf("new host: %w", err)
		}
		warnIfReadable(log, cfg.SwarmKeyFile, "swarm key")
	}
	if cfg.PrivateNetwork && psk == nil {
		return nil, errors.New("new host: a private network (pnet) needs a swarm key")
	}
	addrs, err := listenAddrs(cfg.ListenAddrs, psk != nil)
	if err != nil {
		return nil, fmt.Errorf("new host: %w", err)
	}
	if err := checkPortsFree(addrs); err != nil {
		return nil, fmt.Errorf("new host: %w", err)
	}
	cm, rm, err := limits(cfg)
	if err != nil {
		return nil, fmt.Errorf("new host: %w", err)
	}

	opts := []libp2p.Option{
		libp2p.Identity(key),
		libp2p.ListenAddrs(addrs...),
		// Without reuseport a second process cannot listen on the same
		// port: two agents sharing one would each get half the peers.
		libp2p.Transport(tcp.NewTCPTransport, tcp.DisableReuseport()),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.ConnectionManager(cm),
		libp2p.ResourceManager(rm),
		// Peers dial each other directly inside the cluster, so relaying
		// would only add goroutines. NAT port mapping, hole punching and mDNS
		// stay off simply because we never ask for them.
		libp2p.DisableRelay(),
		// AutoNAT probes reachability for relay and address advertising,
		// which we do not use; fixing the answer stops its background loop.
		libp2p.ForceReachabilityPublic(),
	}
	if cfg.Metrics != nil {
		opts = append(opts, libp2p.PrometheusRegisterer(cfg.Metrics))
	} else {
		opts = append(opts, libp2p.DisableMetrics())
	}
	if cfg.DNS != nil {
		opts = append(opts, libp2p.MultiaddrResolver(cfg.DNS))
	}
	if psk != nil {
		member, err := newMemberTransport(psk, log)
		if err != nil {
			return nil, fmt.Errorf("new host: %w", err)
		}
		opts = append(opts, libp2p.Security(MemberSecurityID, member))
		if cfg.PrivateNetwork {
			opts = append(opts, libp2p.PrivateNetwork(psk))
		}
	} else {
		opts = append(opts,
			libp2p.Security(libp2ptls.ID, libp2ptls.New),
			libp2p.Transport(libp2pquic.NewTransport))
		log.Warn("no swarm key configured: any libp2p host that can reach this one may join the swarm")
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		rm.Close()
		cm.Close()
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("new host: a P2P listen address is already in use (is another agent or supernode running on this port?): %w", err)
		}
		return nil, fmt.Errorf("new host: start libp2p: %w", err)
	}
	log.Info("libp2p host started",
		zap.Stringer("peer", h.ID()),
		zap.Strings("addrs", FullAddrs(h)),
		zap.Bool("swarm_key", psk != nil),
		zap.Bool("pnet", cfg.PrivateNetwork),
		zap.Int("max_conns", maxConns(cfg)))
	return h, nil
}

// checkPortsFree binds each fixed TCP listen address once and lets it go,
// so that a port in use is reported before libp2p starts (which, failing
// to listen, leaves goroutines behind). libp2p then binds without
// SO_REUSEPORT, so a second process that starts in between fails too.
func checkPortsFree(addrs []ma.Multiaddr) error {
	for _, a := range addrs {
		if port, err := a.ValueForProtocol(ma.P_TCP); err != nil || port == "0" {
			continue
		}
		na, err := manet.ToNetAddr(a)
		if err != nil {
			continue // not a plain TCP address; libp2p reports it
		}
		l, err := net.Listen("tcp", na.String())
		if err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				return fmt.Errorf("P2P listen address %s is already in use (is another agent or supernode running on this port?): %w", a, err)
			}
			return fmt.Errorf("P2P listen address %s: %w", a, err)
		}
		l.Close()
	}
	return nil
}

func maxConns(cfg Config) int {
	if cfg.MaxConns > 0 {
		return cfg.MaxConns
	}
	return DefaultAgentConns
}

// limits builds the connection manager and resource manager for cfg: the
// connection manager keeps up to MaxConns connections (trimming to 7/8 of
// it above that, never a protected peer such as an agent's supernodes), and
// the resource manager's system scope admits 5/4 of that plus 64, so that
// the connection manager, not a refusal, decides what goes. libp2p's
// defaults (192 connections kept, system limits scaled from memory) would
// cut a supernode's agents off long before 10,000.
func limits(cfg Config) (*connmgr.BasicConnMgr, network.ResourceManager, error) {
	high := maxConns(cfg)
	grace := cfg.ConnGrace
	if grace <= 0 {
		grace = time.Minute
	}
	cm, err := connmgr.NewConnManager(high*7/8, high, connmgr.WithGracePeriod(grace))
	if err != nil {
		return nil, nil, fmt.Errorf("connection manager: %w", err)
	}
	admit := rcmgr.LimitVal(high + high/4 + 64)
	scope := rcmgr.ResourceLimits{
		Conns: admit, ConnsInbound: admit, ConnsOutbound: admit,
		// A connection holds a file descriptor and a few streams at a time
		// (tracker request, piece transfers both ways).
		FD:      admit + 256,
		Streams: admit * 8, StreamsInbound: admit * 8, StreamsOutbound: admit * 8,
	}
	transient := scope
	// Connections are transient while they handshake: bound how many
	// handshakes run at once, not how many connections end up established.
	transient.Conns, transient.ConnsInbound, transient.ConnsOutbound = admit/4+64, admit/4+64, admit/4+64
	partial := rcmgr.PartialLimitConfig{System: scope, Transient: transient}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(partial.Build(rcmgr.DefaultLimits.AutoScale())))
	if err != nil {
		return nil, nil, fmt.Errorf("resource manager: %w", err)
	}
	return cm, rm, nil
}

// listenAddrs parses the configured listen addresses, or returns the defaults.
func listenAddrs(cfgAddrs []string, private bool) ([]ma.Multiaddr, error) {
	if len(cfgAddrs) == 0 {
		cfgAddrs = []string{defaultTCPAddr}
		if !private {
			cfgAddrs = append(cfgAddrs, defaultQUICAddr)
		}
	}
	addrs := make([]ma.Multiaddr, 0, len(cfgAddrs))
	for _, s := range cfgAddrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("listen address %q: %w", s, err)
		}
		if private && isQUIC(a) {
			return nil, fmt.Errorf("listen address %q: QUIC cannot be used with a swarm key (libp2p private networks are TCP only)", s)
		}
		addrs = append(addrs, a)
	}
	return addrs, nil
}

func isQUIC(a ma.Multiaddr) bool {
	for _, c := range a {
		if code := c.Protocol().Code; code == ma.P_QUIC || code == ma.P_QUIC_V1 {
			return true
		}
	}
	return false
}

// FullAddrs returns the host's dialable addresses with the /p2p/<id> suffix,
// the form ParsePeerAddr and agent configs expect.
func FullAddrs(h host.Host) []string {
	id, err := ma.NewComponent("p2p", h.ID().String())
	if err != nil {
		return nil // a host's own ID always encodes; nothing useful to report
	}
	out := make([]string, 0, len(h.Addrs()))
	for _, a := range h.Addrs() {
		out = append(out, a.Encapsulate(id).String())
	}
	return out
}

// ParsePeerAddr parses a multiaddr such as /ip4/10.0.0.1/tcp/4001/p2p/<id>.
// Both the transport part and the /p2p/<id> part are required: without a
// DHT, an ID alone cannot be dialled.
func ParsePeerAddr(s string) (peer.AddrInfo, error) {
	a, err := ma.NewMultiaddr(s)
	if err != nil {
		return peer.AddrInfo{}, fmt.Errorf("parse peer address %q: %w", s, err)
	}
	transport, id := peer.SplitAddr(a)
	if id == "" {
		return peer.AddrInfo{}, fmt.Errorf("parse peer address %q: missing /p2p/<peer id>: %w", s, peer.ErrInvalidAddr)
	}
	if len(transport) == 0 {
		return peer.AddrInfo{}, fmt.Errorf("parse peer address %q: missing transport address before /p2p/<peer id>", s)
	}
	return peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{transport}}, nil
}

// AnnounceAddrs returns the addresses to give other peers: the host's
// listen addresses without loopback ones, unless loopback is all it has
// (a single-machine setup). A peer told to dial 127.0.0.1 would reach
// its own node.
func AnnounceAddrs(h host.Host) []string {
	var public, loopback []string
	for _, a := range h.Addrs() {
		if manet.IsIPLoopback(a) {
			loopback = append(loopback, a.String())
		} else {
			public = append(public, a.String())
		}
	}
	if len(public) > 0 {
		return public
	}
	return loopback
}
