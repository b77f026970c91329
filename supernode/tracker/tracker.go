// Package tracker is the supernode's view of every blob's swarm: the piece
// table the seed publishes as it hashes, which peers hold which pieces
// (including peers still downloading), super-seeding offers and
// back-to-source permits. The policy is the pure State (no host, time and
// randomness passed in, every call returns at once); Tracker is the thin
// driver that answers agents over /starling/tracker/2.
package tracker

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	manet "github.com/multiformats/go-multiaddr/net"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// Seeder starts the upstream fetch of a blob the tracker has no piece
// table for. It reports back through the Tracker's Set* methods.
type Seeder interface {
	Ensure(req swarmproto.TrackerRequest)
}

// Authorizer returns nil if upstream gives digest in registry/repo to the
// credentials a poll forwards, or why not (an *ocierr.Error carries the
// status). It may block on upstream.
type Authorizer func(ctx context.Context, registry, repo, digest, authorization string) error

// Tracker serves a State over libp2p.
type Tracker struct {
	state     *State
	host      host.Host
	seeder    Seeder
	authorize Authorizer
	log       *zap.Logger
	inflight  atomic.Int64 // requests being handled, the State's pressure
}

// New builds a Tracker for host h; SetSeeder must be called before Register.
func New(cfg Config, h host.Host, log *zap.Logger) *Tracker {
	var seed [16]byte
	_, _ = crand.Read(seed[:]) // never fails (crypto/rand panics instead)
	rng := rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[:8]), binary.LittleEndian.Uint64(seed[8:])))
	return &Tracker{state: NewState(cfg, h.ID(), p2p.AnnounceAddrs(h), rng), host: h, log: log}
}

// State is the tracker's policy, for tests and the simulator.
func (t *Tracker) State() *State { return t.state }

// SetSeeder wires the seed (which itself needs the tracker).
func (t *Tracker) SetSeeder(s Seeder) { t.seeder = s }

// SetAuthorizer makes every poll (the request that hands out a piece
// table and peers, and may start the seed) pass a, before the State sees
// it; must be called before Register.
func (t *Tracker) SetAuthorizer(a Authorizer) { t.authorize = a }

// Register installs the protocol handler.
func (t *Tracker) Register() { t.host.SetStreamHandler(swarmproto.TrackerProtocol, t.handle) }

// rpcDeadline bounds one exchange: answers never wait, so this only cuts
// off a peer that does not send or read. It matches the minute an agent
// waits for an answer: a CPU-starved supernode can take seconds between
// reading a request and writing its answer, and an answer cut then is
// work thrown away.
const rpcDeadline = time.Minute

func (t *Tracker) handle(st network.Stream) {
	defer st.Close()
	t.state.SetPressure(int(t.inflight.Add(1)))
	defer func() { t.state.SetPressure(int(t.inflight.Add(-1))) }()
	_ = st.SetDeadline(time.Now().Add(rpcDeadline))
	var req swarmproto.TrackerRequest
	if err := wire.ReadMsg(st, &req, swarmproto.MaxRequestBytes); err != nil {
		st.Reset()
		return
	}
	from := Asker{ID: st.Conn().RemotePeer()}
	if ip, err := manet.ToIP(st.Conn().RemoteMultiaddr()); err == nil {
		if a, ok := netip.AddrFromSlice(ip); ok {
			from.IP = a.Unmap()
		}
	}
	if !from.IP.IsValid() {
		// Not an IP connection: nothing we can vouch for. Use an address
		// no announced one survives rewriting onto as a peer's.
		from.IP = netip.IPv6Unspecified()
	}
	resp := t.check(&req)
	if resp == nil {
		resp = t.Serve(time.Now(), from, &req)
	}
	if err := wire.WriteMsg(st, resp); err != nil {
		t.log.Debug("write tracker response", zap.Stringer("peer", from.ID), zap.Error(err))
		st.Reset()
	}
}

// authorizeTimeout bounds the upstream check of one poll, within rpcDeadline.
const authorizeTimeout = 8 * time.Second

// check returns the refusal of a poll the Authorizer does not pass, nil
// for anything else.
func (t *Tracker) check(req *swarmproto.TrackerRequest) *swarmproto.TrackerResponse {
	if t.authorize == nil || req.Op != swarmproto.OpPoll || req.Validate() != nil {
		return nil // an invalid request is refused by the State
	}
	ctx, cancel := context.WithTimeout(context.Background(), authorizeTimeout)
	defer cancel()
	err := t.authorize(ctx, req.Registry, req.Repo, req.Digest, req.Authorization)
	if err == nil {
		return nil
	}
	status := http.StatusBadGateway
	msg := "access could not be confirmed upstream"
	var oe *ocierr.Error
	if errors.As(err, &oe) {
		status = oe.Status
		msg = oe.Message
	}
	t.log.Debug("poll refused", zap.String("digest", req.Digest), zap.String("registry", req.Registry),
		zap.String("repo", req.Repo), zap.Error(err))
	return refused(status, t.state.cfg.MaxInterval, "not authorized upstream: %s", msg)
}

// Serve answers one request, starting the seed when the State asks for it.
func (t *Tracker) Serve(now time.Time, from Asker, req *swarmproto.TrackerRequest) *swarmproto.TrackerResponse {
	res := t.state.Handle(now, from, req)
	if res.Seed && t.seeder != nil {
		t.seeder.Ensure(*req)
	}
	return res.Resp
}

// SetSize records the blob's size once the seed knows it.
func (t *Tracker) SetSize(digest string, size, pieceSize int64) {
	t.state.SetSize(time.Now(), digest, size, pieceSize)
}

// AddPiece publishes the CID of piece i; pieces arrive in order.
func (t *Tracker) AddPiece(digest string, i int, c cid.Cid) {
	t.state.AddPiece(time.Now(), digest, i, c)
}

// SetMetainfo publishes a complete piece table.
func (t *Tracker) SetMetainfo(m *piece.Metainfo, seedHave []byte) {
	t.state.SetMetainfo(time.Now(), m, seedHave)
}

// SetSeedHave publishes the seed's own durable pieces.
func (t *Tracker) SetSeedHave(digest string, have []byte) {
	t.state.SetSeedHave(time.Now(), digest, have)
}

// SeedGone records that the supernode's store dropped the blob.
func (t *Tracker) SeedGone(digest string) { t.state.SeedGone(time.Now(), digest) }

// Fail records that the seed could not fetch the blob.
func (t *Tracker) Fail(digest string, err error, status int) {
	t.state.Fail(time.Now(), digest, err, status)
}

// Status lists every blob the tracker knows.
func (t *Tracker) Status() []BlobStatus { return t.state.Status() }
