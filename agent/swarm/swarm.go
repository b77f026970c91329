// Package swarm is the agent's P2P blob filler: it learns a blob's piece
// table and peers from the supernode that owns the blob, downloads pieces
// from several peers at once (rarest first, readers' position first),
// verifies each against its CID before it is written, and serves what it
// has to other peers at once. When the swarm cannot help (no supernode, a
// seed error, no progress) it goes back to the source, so a pull never
// fails because of P2P.
package swarm

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	lpswarm "github.com/libp2p/go-libp2p/p2p/net/swarm"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/agent/blobcache"
	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/rendezvous"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/registryproxy"
)

// Config tunes the swarm.
type Config struct {
	// Supernodes are the trackers/seeds; each blob's owner is picked by
	// rendezvous hashing of its digest.
	Supernodes []peer.AddrInfo
	// MaxInflight bounds concurrent piece downloads of the agent, across
	// blobs: each holds one piece buffer, so this bounds memory.
	MaxInflight int
	// PerPeer bounds concurrent requests to one peer.
	PerPeer int
	// StallTimeout is how long the swarm may go without completing a piece
	// before the agent fetches the rest from upstream.
	StallTimeout time.Duration
	// Download paces piece downloads (nil: unlimited).
	Download *ratelimit.Limiter
	// Clock is the download policy's time (nil: the wall clock).
	Clock Clock
	// Fetcher fetches pieces (nil: over the host, paced by Download).
	Fetcher PieceFetcher
	// OnFallback, if set, is called each time a blob goes back to the
	// source, with one of metrics.FallbackReasons.
	OnFallback func(reason string)
	// OnCorrupt, if set, is called for each piece that failed its CID.
	OnCorrupt func()
}

// Swarm implements blobcache.Filler.
type Swarm struct {
	cfg    Config
	host   host.Host
	store  *store.Store
	origin *blobcache.Origin
	log    *zap.Logger
	owners []string // supernode peer IDs, as strings for rendezvous

	rngMu sync.Mutex
	rng   *rand.Rand // seeds each download's own source

	clock   Clock
	fetcher PieceFetcher

	fromPeers atomic.Int64
	fromSeed  atomic.Int64
	watchNews atomic.Int64
	bufs      chan []byte // piece buffers, shared by all downloads
}

var _ blobcache.Filler = (*Swarm)(nil)

// New builds a Swarm on host h. origin is the back-to-source path.
func New(cfg Config, h host.Host, st *store.Store, origin *blobcache.Origin, log *zap.Logger) *Swarm {
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 8
	}
	if cfg.PerPeer <= 0 {
		cfg.PerPeer = 2
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 15 * time.Second
	}
	var seed [32]byte
	_, _ = crand.Read(seed[:]) // never fails (crypto/rand panics instead)
	s := &Swarm{
		cfg: cfg, host: h, store: st, origin: origin, log: log, bufs: make(chan []byte, cfg.MaxInflight),
		rng: rand.New(rand.NewChaCha8(seed)), clock: cfg.Clock, fetcher: cfg.Fetcher,
	}
	if s.clock == nil {
		s.clock = WallClock{}
	}
	if s.fetcher == nil {
		s.fetcher = HostFetcher{Host: h, Download: cfg.Download}
	}
	for range cfg.MaxInflight {
		s.bufs <- nil // allocated on first use
	}
	for _, sn := range cfg.Supernodes {
		p2p.KeepSupernode(h, sn)
		s.owners = append(s.owners, sn.ID.String())
	}
	return s
}

// newRand returns a random source for one download.
func (s *Swarm) newRand() *rand.Rand {
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return rand.New(rand.NewPCG(s.rng.Uint64(), s.rng.Uint64()))
}

// BytesFromPeers returns blob bytes downloaded from other agents.
func (s *Swarm) BytesFromPeers() int64 { return s.fromPeers.Load() }

// WatchNews returns the bitmaps watched peers have pushed (/starling/watch/1).
func (s *Swarm) WatchNews() int64 { return s.watchNews.Load() }

// BytesFromSeed returns blob bytes downloaded from supernodes.
func (s *Swarm) BytesFromSeed() int64 { return s.fromSeed.Load() }

// errFallback carries why the swarm gave up on a blob.
type errFallback struct {
	reason      string
	trackerLost bool          // the owning supernode stopped answering
	stalled     bool          // no progress for StallTimeout
	permit      bool          // the owning supernode granted a back-to-source permit
	lease       time.Duration // for this long (renewed while fetching)
}

// kind is the metrics label of the fallback.
func (e *errFallback) kind() string {
	switch {
	case e.trackerLost:
		return "supernode_lost"
	case e.stalled:
		return "stalled"
	}
	return "swarm_error"
}

func (s *Swarm) fellBack(reason string) {
	if s.cfg.OnFallback != nil {
		s.cfg.OnFallback(reason)
	}
}

func (e *errFallback) Error() string { return "back to source: " + e.reason }

// Fill implements blobcache.Filler.
func (s *Swarm) Fill(ctx context.Context, req registryproxy.BlobRequest, started func(*store.Partial)) error {
	if s.store.Has(req.Digest) {
		return nil // an earlier fill committed it after this one was asked for
	}
	tried := map[peer.ID]bool{}
	tr, first, err := s.join(ctx, req, tried)
	for errors.Is(err, errSlowSeed) {
		// The owner answers but its seed is still waiting on upstream: a
		// slow swarm, not a dead one. Only a few agents per blob may go to
		// upstream themselves; the others keep waiting for the seed.
		if s.mayGoToSource(ctx, tr, req.Digest) {
			s.log.Warn("seed is slow, fetching from upstream with a back-to-source permit", zap.String("digest", req.Digest))
			s.fellBack("slow_seed")
			err = s.origin.Fill(ctx, req, started)
			s.release(tr)
			return err
		}
		first, err = tr.waitForSize(ctx, s.cfg.StallTimeout)
	}
	if err != nil {
		var oe *ocierr.Error
		if errors.As(err, &oe) && oe.Status >= 400 && oe.Status < 500 {
			// The seed was refused upstream: the client's own request will be
			// refused the same way, with the right status, by the origin path.
			s.log.Info("seed refused upstream; asking upstream with the client's credentials", zap.String("digest", req.Digest), zap.Error(err))
			s.fellBack("seed_refused")
		} else {
			s.log.Warn("swarm unavailable, fetching from upstream", zap.String("digest", req.Digest),
				zap.String("cause", p2p.ExplainDialError(err)), zap.Error(err))
			s.fellBack("no_supernode")
		}
		return s.origin.Fill(ctx, req, started)
	}
	p, err := s.store.OpenPartial(req.Digest, first.Size, first.PieceSize)
	if errors.Is(err, store.ErrComplete) {
		return nil
	}
	if err != nil {
		return err
	}
	defer p.Release()
	started(p)

	var d *download
	for {
		d = newDownload(s, tr, req, p)
		d.src = blobcache.SourcesFrom(ctx)
		err = d.run(ctx, first)
		var fb *errFallback
		if !errors.As(err, &fb) {
			break
		}
		if fb.trackerLost {
			// Fail over to the next owner: it seeds the blob once more, which
			// costs the registry one fetch, not one per agent.
			tried[tr.peer] = true
			next, nfirst, jerr := s.join(ctx, req, tried)
			if jerr == nil && nfirst.Size == p.Size() && nfirst.PieceSize == p.PieceSize() {
				s.log.Warn("supernode lost mid-download; continuing with the next one", zap.String("digest", req.Digest),
					zap.String("lost", tr.peer.String()), zap.String("next", next.peer.String()), zap.String("reason", fb.reason))
				tr, first = next, nfirst
				continue
			}
		}
		s.fellBack(fb.kind())
		s.log.Warn("swarm stalled, fetching missing pieces from upstream", zap.String("digest", req.Digest),
			zap.String("reason", fb.reason), zap.Int("have", p.Have().Count()), zap.Int("of", piece.Count(p.Size(), p.PieceSize())))
		if fb.permit {
			err = s.fetchWithPermit(ctx, req, p, d.cids, tr, fb.lease)
		} else {
			err = s.origin.FetchPieces(ctx, req, p, d.cids)
		}
		break
	}
	if err != nil {
		p.Fail(err)
		return err
	}
	if err := p.Commit(); err != nil {
		return err
	}
	if len(d.cids) == piece.Count(p.Size(), p.PieceSize()) {
		if err := s.store.PutMetainfo(&piece.Metainfo{Digest: req.Digest, Size: p.Size(), PieceSize: p.PieceSize(), Pieces: d.cids}); err != nil {
			s.log.Warn("record metainfo", zap.String("digest", req.Digest), zap.Error(err))
		}
	}
	d.announceFinal()
	return nil
}

// mayGoToSource asks the blob's tracker for a back-to-source permit. A
// tracker that cannot be asked does not hold the pull up: the agent then
// goes alone, so a pull never fails because of P2P.
func (s *Swarm) mayGoToSource(ctx context.Context, tr *trackerClient, digest string) bool {
	ok, _, err := tr.permit(ctx)
	if err != nil {
		s.log.Info("no back-to-source permit to be had; going alone", zap.String("digest", digest), zap.Error(err))
		return true
	}
	if !ok {
		s.log.Debug("back-to-source permit refused; staying with the swarm", zap.String("digest", digest))
	}
	return ok
}

// release hands a permit back, best effort.
func (s *Swarm) release(tr *trackerClient) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = tr.release(ctx)
}

// Withdraw tells the blob's supernodes that this agent no longer holds
// it (evicted, or quarantined after failing a check), so they stop handing
// it out as a source. Supernodes that do not track the blob are ignored;
// the first error of the others is returned.
func (s *Swarm) Withdraw(ctx context.Context, digest string) error {
	var first error
	for _, id := range rendezvous.Rank(digest, s.owners) {
		pid, err := peer.Decode(id)
		if err != nil {
			continue
		}
		tr := &trackerClient{host: s.host, peer: pid, req: registryproxy.BlobRequest{Digest: digest}}
		var oe *ocierr.Error
		if err := tr.withdraw(ctx); err != nil && !(errors.As(err, &oe) && oe.Status == http.StatusNotFound) && first == nil {
			first = fmt.Errorf("withdraw %s from supernode %s: %w", digest, pid, err)
		}
	}
	return first
}

// fetchWithPermit fetches the missing pieces from upstream under a
// back-to-source permit: renewed at half its lease while the fetch runs,
// released at the end.
func (s *Swarm) fetchWithPermit(ctx context.Context, req registryproxy.BlobRequest, p *store.Partial, cids []cid.Cid, tr *trackerClient, lease time.Duration) error {
	rctx, stop := context.WithCancel(ctx)
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		if lease <= 0 {
			return
		}
		tick := s.clock.NewTicker(lease / 2)
		defer tick.Stop()
		for {
			select {
			case <-tick.C():
				if _, _, err := tr.permit(rctx); err != nil && rctx.Err() == nil {
					s.log.Debug("renew back-to-source permit", zap.String("digest", req.Digest), zap.Error(err))
				}
			case <-rctx.Done():
				return
			}
		}
	}()
	err := s.origin.FetchPieces(ctx, req, p, cids)
	stop()
	<-renewed
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rpcTimeout)
	defer cancel()
	if rerr := tr.release(cctx); rerr != nil {
		s.log.Debug("release back-to-source permit", zap.String("digest", req.Digest), zap.Error(rerr))
	}
	return err
}

// join asks the blob's supernodes in rendezvous order until one answers
// with the blob's size.
func (s *Swarm) join(ctx context.Context, req registryproxy.BlobRequest, skip map[peer.ID]bool) (*trackerClient, *swarmproto.TrackerResponse, error) {
	errs := []error{errors.New("no supernode left to ask")}
	for _, id := range rendezvous.Rank(req.Digest, s.owners) {
		pid, _ := peer.Decode(id)
		if skip[pid] {
			continue
		}
		tr := &trackerClient{host: s.host, peer: pid, req: req}
		resp, err := s.ask(ctx, tr)
		if err == nil || errors.Is(err, errSlowSeed) {
			return tr, resp, err // answered: a slow seed is still this blob's seed
		}
		var oe *ocierr.Error
		if errors.As(err, &oe) {
			return nil, nil, err // the owner answered: no point asking another
		}
		skip[pid] = true
		errs = append(errs, fmt.Errorf("supernode %s: %w", pid, err))
	}
	return nil, nil, errors.Join(errs...)
}

// ask waits for the blob's size from tr's supernode. A dial that timed out
// (a handshake a starved machine did not finish in time; a refused
// connection is final) is tried again, past libp2p's dial backoff, for up
// to StallTimeout before the supernode counts as unreachable and the agent
// goes to the registry alone.
func (s *Swarm) ask(ctx context.Context, tr *trackerClient) (*swarmproto.TrackerResponse, error) {
	start := time.Now()
	for {
		resp, err := tr.waitForSize(ctx, s.cfg.StallTimeout)
		if err == nil || !dialTimedOut(err) || ctx.Err() != nil || time.Since(start) >= s.cfg.StallTimeout {
			return resp, err
		}
		s.log.Info("dial to the supernode timed out or is backing off; dialling it again", zap.String("supernode", tr.peer.String()),
			zap.String("digest", tr.req.Digest), zap.Error(err))
		if n, ok := s.host.Network().(interface{ Backoff() *lpswarm.DialBackoff }); ok {
			n.Backoff().Clear(tr.peer)
		}
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// dialTimedOut reports whether err is a connection to a supernode that
// could not be set up in time (not a late answer on a live one), or one
// refused by libp2p's dial backoff after an earlier failure (whose cause
// the next dial tells).
func dialTimedOut(err error) bool {
	if errors.Is(err, errLate) {
		return false
	}
	var ne net.Error
	return errors.Is(err, lpswarm.ErrDialBackoff) || errors.Is(err, lpswarm.ErrDialTimeout) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func cidsFrom(strs []string) ([]cid.Cid, error) {
	out := make([]cid.Cid, 0, len(strs))
	for _, s := range strs {
		c, err := swarmproto.ParseCID(s)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
