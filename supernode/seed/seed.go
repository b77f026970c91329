// Package seed fetches each blob from the upstream registry once, cuts it
// into pieces as the bytes arrive and publishes each piece's CID to the
// tracker at once, so agents start on piece 0 while the rest still streams.
package seed

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
)

// Publisher is the tracker side the seed reports to.
type Publisher interface {
	SetSize(digest string, size, pieceSize int64)
	AddPiece(digest string, i int, c cid.Cid)
	SetMetainfo(m *piece.Metainfo, seedHave []byte)
	SetSeedHave(digest string, have []byte)
	Fail(digest string, err error, status int)
}

// Seed is the supernode's upstream fetcher.
type Seed struct {
	store     *store.Store
	upstream  *upstream.Client
	regs      *upstream.Set
	pub       Publisher
	pieceSize int64
	timeout   time.Duration
	log       *zap.Logger

	mu      sync.Mutex
	running map[string]bool
	wg      sync.WaitGroup
	closing chan struct{}
	closed  sync.Once
	fetches int // upstream fetches started, for tests and status

	fromUpstream atomic.Int64 // blob bytes read from upstream (for metrics)
}

// New builds a Seed.
func New(st *store.Store, up *upstream.Client, regs *upstream.Set, pub Publisher, pieceSize int64, timeout time.Duration, log *zap.Logger) *Seed {
	if pieceSize <= 0 {
		pieceSize = piece.DefaultSize
	}
	if timeout <= 0 {
		timeout = 30 * time.Minute
	}
	return &Seed{store: st, upstream: up, regs: regs, pub: pub, pieceSize: pieceSize, timeout: timeout, log: log,
		running: map[string]bool{}, closing: make(chan struct{})}
}

// Ensure makes the blob's piece table available: from the store if the
// blob is here, or by starting the single upstream fetch for it.
func (s *Seed) Ensure(req swarmproto.TrackerRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running[req.Digest] {
		return
	}
	if m, err := s.store.Metainfo(req.Digest); err == nil && s.store.Has(req.Digest) {
		all := piece.NewBitmap(len(m.Pieces))
		for i := range m.Pieces {
			all.Set(i)
		}
		s.pub.SetMetainfo(m, all.Bytes())
		return
	}
	s.running[req.Digest] = true
	s.wg.Add(1)
	go s.fetch(req)
}

// publishComplete publishes the piece table of a blob the store has whole,
// rebuilding it from the file when it was lost (a crash between commit and
// recording it, or a blob adopted at recovery).
func (s *Seed) publishComplete(digest string) (int64, error) {
	m, err := s.store.Metainfo(digest)
	if err != nil {
		f, size, oerr := s.store.Open(digest)
		if oerr != nil {
			return 0, oerr
		}
		h := piece.NewHasher(size, s.pieceSize, nil)
		_, cerr := io.Copy(h, f)
		f.Close()
		if cerr != nil {
			return 0, fmt.Errorf("rehash %s: %w", digest, cerr)
		}
		if h.Digest() != digest {
			return 0, fmt.Errorf("rehash %s: file hashes to %s", digest, h.Digest())
		}
		m = &piece.Metainfo{Digest: digest, Size: size, PieceSize: s.pieceSize, Pieces: h.Pieces()}
		if err := s.store.PutMetainfo(m); err != nil {
			return 0, err
		}
	}
	all := piece.NewBitmap(len(m.Pieces))
	for i := range m.Pieces {
		all.Set(i)
	}
	s.pub.SetMetainfo(m, all.Bytes())
	return m.Size, nil
}

// Fetches returns how many upstream fetches were started.
func (s *Seed) Fetches() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fetches
}

// BytesFromUpstream returns blob bytes the seed read from upstream
// registries: the supernode's share of registry egress.
func (s *Seed) BytesFromUpstream() int64 { return s.fromUpstream.Load() }

// countingReader adds what it reads to n.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	k, err := c.r.Read(b)
	c.n.Add(int64(k))
	return k, err
}

// Close cancels running fetches and waits for them.
func (s *Seed) Close() {
	s.closed.Do(func() { close(s.closing) })
	s.wg.Wait()
}

func (s *Seed) fetch(req swarmproto.TrackerRequest) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.running, req.Digest)
		s.mu.Unlock()
	}()
	// Detached from the asking agent: every agent waits on this fetch.
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	go func() {
		select {
		case <-s.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	start := time.Now()
	size, err := s.run(ctx, req)
	if err != nil {
		status := 0
		var oe *ocierr.Error
		if errors.As(err, &oe) {
			status = oe.Status
		}
		s.log.Warn("seed fetch failed", zap.String("digest", req.Digest), zap.String("registry", req.Registry),
			zap.String("repo", req.Repo), zap.Error(err))
		s.pub.Fail(req.Digest, err, status)
		return
	}
	s.log.Info("seeded blob from upstream", zap.String("digest", req.Digest), zap.String("registry", req.Registry),
		zap.String("repo", req.Repo), zap.Int64("size", size), zap.Duration("elapsed", time.Since(start)))
}

func (s *Seed) run(ctx context.Context, req swarmproto.TrackerRequest) (int64, error) {
	if s.store.Has(req.Digest) {
		return s.publishComplete(req.Digest)
	}
	reg, ok := s.regs.Lookup(req.Registry)
	if !ok {
		return 0, ocierr.New(http.StatusForbidden, ocierr.Denied, "registry %q is not mirrored by this supernode", req.Registry)
	}
	s.mu.Lock()
	s.fetches++
	s.mu.Unlock()
	resp, err := s.upstream.Do(ctx, upstream.Request{
		Registry: reg, Repo: req.Repo, Method: http.MethodGet, Path: "blobs/" + req.Digest, Authorization: req.Authorization,
	})
	if err != nil {
		return 0, fmt.Errorf("fetch %s: %w", req.Digest, err)
	}
	defer resp.Body.Close()
	size := resp.ContentLength
	if size < 0 {
		return 0, fmt.Errorf("fetch %s: upstream sent no Content-Length", req.Digest)
	}
	// The seed must publish every piece's CID, so it always hashes from
	// byte 0: a partial left by an earlier run is started over.
	s.store.DiscardPartial(req.Digest)
	p, err := s.store.OpenPartial(req.Digest, size, s.pieceSize)
	if errors.Is(err, store.ErrComplete) {
		return s.publishComplete(req.Digest)
	}
	if err != nil {
		return 0, err
	}
	defer p.Release()
	if p.Offset() != 0 {
		// Someone still reads an earlier attempt's partial: start it over.
		if err := p.Restart(); err != nil {
			return 0, err
		}
	}
	s.pub.SetSize(req.Digest, size, s.pieceSize)

	// Mirror the partial's piece CIDs and durable pieces to the tracker from
	// a goroutine of its own: the upstream read path only appends to a
	// slice, so it never waits on tracker state. The watcher is stopped
	// before any failure is published, so it cannot advertise pieces of a
	// failed attempt afterwards.
	var (
		pendingMu sync.Mutex
		pending   []cid.Cid // CIDs hashed and not yet published
		published int
	)
	kick := make(chan struct{}, 1)
	watchDone, watcherGone := make(chan struct{}), make(chan struct{})
	defer func() {
		close(watchDone)
		<-watcherGone
	}()
	go func() {
		defer close(watcherGone)
		for {
			ch := p.Changed()
			pendingMu.Lock()
			fresh := pending
			pending = nil
			pendingMu.Unlock()
			for _, c := range fresh {
				s.pub.AddPiece(req.Digest, published, c)
				published++
			}
			have := p.Have()
			s.pub.SetSeedHave(req.Digest, have.Bytes())
			select {
			case <-ch:
			case <-kick:
			case <-watchDone:
				return
			}
		}
	}()

	var cids []cid.Cid
	err = p.Append(countingReader{resp.Body, &s.fromUpstream}, func(_ int, c cid.Cid) {
		cids = append(cids, c)
		pendingMu.Lock()
		pending = append(pending, c)
		pendingMu.Unlock()
		select {
		case kick <- struct{}{}:
		default:
		}
	})
	if err != nil {
		p.Fail(err)
		return 0, err
	}
	if err := p.Commit(); err != nil {
		return 0, err
	}
	m := &piece.Metainfo{Digest: req.Digest, Size: size, PieceSize: s.pieceSize, Pieces: cids}
	if err := s.store.PutMetainfo(m); err != nil {
		return 0, err
	}
	all := piece.NewBitmap(len(cids))
	for i := range cids {
		all.Set(i)
	}
	s.pub.SetMetainfo(m, all.Bytes())
	return size, nil
}
