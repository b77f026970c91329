// Package p2p sets up the libp2p host shared by the agent and the supernode:
// TCP (and QUIC on open networks), Noise, yamux, an optional private network
// from a pre-shared swarm key, and a persistent Ed25519 identity.
package p2p

import (
	"crypto/rand"
	"fmt"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Config selects addresses and key files for NewHost. The zero value gives an
// ephemeral identity on an open network listening on loopback.
type Config struct {
	// ListenAddrs are multiaddrs to listen on. Empty means
	// /ip4/127.0.0.1/tcp/0 and, without a swarm key, /ip4/127.0.0.1/udp/0/quic-v1.
	ListenAddrs []string
	// IdentityFile holds the host's private key; it is created if absent.
	// Empty means a new identity on every start.
	IdentityFile string
	// SwarmKeyFile holds the pre-shared key of the private network. Empty
	// means an open network, fit only for development.
	SwarmKeyFile string
	// Metrics receives libp2p's own Prometheus metrics (connections,
	// streams, resource manager, ...). Nil turns them off rather than
	// letting libp2p use the global default registerer.
	Metrics prometheus.Registerer
}

const (
	defaultTCPAddr  = "/ip4/127.0.0.1/tcp/0"
	defaultQUICAddr = "/ip4/127.0.0.1/udp/0/quic-v1"
)

// NewHost starts a libp2p host for cfg. The caller owns it and must Close it.
//
// With a swarm key only TCP is enabled: go-libp2p's QUIC transport refuses a
// private network (quic.NewTransport fails with "QUIC doesn't support private
// networks yet"), because pnet protects a byte stream beneath the security
// handshake and QUIC has no such layer. A QUIC listen address combined with a
// swarm key is therefore a configuration error rather than silently ignored.
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
	addrs, err := listenAddrs(cfg.ListenAddrs, psk != nil)
	if err != nil {
		return nil, fmt.Errorf("new host: %w", err)
	}

	opts := []libp2p.Option{
		libp2p.Identity(key),
		libp2p.ListenAddrs(addrs...),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
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
	if psk != nil {
		opts = append(opts, libp2p.PrivateNetwork(psk))
	} else {
		opts = append(opts, libp2p.Transport(libp2pquic.NewTransport))
		log.Warn("no swarm key configured: any libp2p host that can reach this one may join the swarm")
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("new host: start libp2p: %w", err)
	}
	log.Info("libp2p host started",
		zap.Stringer("peer", h.ID()),
		zap.Strings("addrs", FullAddrs(h)),
		zap.Bool("private_network", psk != nil))
	return h, nil
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
