// Package blobcache is the agent's BlobSource: complete blobs come from the
// local store; anything else is filled into the store by one fill per blob
// (whatever the number of clients asking), which every client streams from
// while it runs.
package blobcache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/registryproxy"
)

// Filler brings a blob into the store. It calls started once the partial
// blob exists, so that readers can stream it, and returns when the blob is
// committed or the fill has failed (after failing the partial).
type Filler interface {
	Fill(ctx context.Context, req registryproxy.BlobRequest, started func(*store.Partial)) error
}

// Cache implements registryproxy.BlobSource.
type Cache struct {
	store   *store.Store
	filler  Filler
	timeout time.Duration
	log     *zap.Logger

	mu      sync.Mutex
	jobs    map[string]*job
	wg      sync.WaitGroup
	closing chan struct{}
	closed  sync.Once
	shut    bool // no new fills (under mu)
}

var _ registryproxy.BlobSource = (*Cache)(nil)

type job struct {
	started chan struct{} // closed when p is set
	done    chan struct{} // closed when the fill has ended
	p       *store.Partial
	err     error
}

// New builds a Cache. timeout bounds one fill; it runs detached from the
// clients so that one client going away cannot abort a fill others wait on.
func New(st *store.Store, filler Filler, timeout time.Duration, log *zap.Logger) *Cache {
	if timeout <= 0 {
		timeout = 30 * time.Minute
	}
	return &Cache{store: st, filler: filler, timeout: timeout, log: log, jobs: map[string]*job{}, closing: make(chan struct{})}
}

// OpenBlob returns the blob, starting a fill if it is not complete here.
func (c *Cache) OpenBlob(ctx context.Context, req registryproxy.BlobRequest) (registryproxy.Blob, error) {
	// Two rounds: a fill may complete between our store check and joining it.
	for range 2 {
		f, size, err := c.store.Open(req.Digest)
		if err == nil {
			b := newFileBlob(f, size, req.Digest, c.store)
			// The first serve after our own commit is not hashed again:
			// the commit hashed these very bytes (see store.TakeFresh).
			b.ok = c.store.TakeFresh(req.Digest, f)
			return b, nil
		}
		if !errors.Is(err, store.ErrNotFound) {
			return nil, err
		}
		j := c.join(req)
		select {
		case <-j.started:
		case <-j.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for fill of %s: %w", req.Digest, ctx.Err())
		}
		c.mu.Lock()
		if c.jobs[req.Digest] == j && j.p != nil {
			j.p.Retain()
			c.mu.Unlock()
			return &partialBlob{p: j.p, ctx: ctx}, nil
		}
		c.mu.Unlock()
		<-j.done
		if j.err != nil {
			return nil, j.err
		}
	}
	return nil, fmt.Errorf("blob %s was filled but is not in the store", req.Digest)
}

// Stat implements registryproxy.BlobSource.
func (c *Cache) Stat(digest string) (int64, bool) {
	if f, size, err := c.store.Open(digest); err == nil {
		f.Close()
		return size, true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if j, ok := c.jobs[digest]; ok && j.p != nil {
		return j.p.Size(), true
	}
	return 0, false
}

// Prefetch implements registryproxy.BlobSource: it starts the fill of a
// blob that is neither here nor on its way.
func (c *Cache) Prefetch(req registryproxy.BlobRequest) {
	if c.store.Has(req.Digest) {
		return
	}
	c.join(req)
}

// join returns the running fill for the blob or starts one.
func (c *Cache) join(req registryproxy.BlobRequest) *job {
	c.mu.Lock()
	defer c.mu.Unlock()
	if j, ok := c.jobs[req.Digest]; ok {
		return j
	}
	j := &job{started: make(chan struct{}), done: make(chan struct{})}
	if c.shut {
		j.err = errors.New("agent is shutting down")
		close(j.done)
		return j
	}
	c.jobs[req.Digest] = j
	c.wg.Add(1)
	go c.run(j, req)
	return j
}

func (c *Cache) run(j *job, req registryproxy.BlobRequest) {
	defer c.wg.Done()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	go func() {
		select {
		case <-c.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	start := time.Now()
	src := &Sources{}
	err := c.filler.Fill(WithSources(ctx, src), req, func(p *store.Partial) {
		c.mu.Lock()
		p.Retain() // the job's own reference, dropped when it ends
		j.p = p
		c.mu.Unlock()
		close(j.started)
	})
	c.mu.Lock()
	delete(c.jobs, req.Digest)
	j.err = err
	p := j.p
	c.mu.Unlock()
	if p != nil {
		p.Release()
	}
	close(j.done)
	if err != nil {
		c.log.Warn("blob fill failed", zap.String("digest", req.Digest), zap.String("registry", req.Registry.Host),
			zap.String("repo", req.Repo), zap.Duration("elapsed", time.Since(start)), zap.Error(err))
		return
	}
	if p == nil {
		return // complete before this fill started: nothing was fetched
	}
	// One line per blob brought in, so an operator sees Starling working
	// and where each blob came from.
	fromUp, fromPeers, fromSeed := src.Split()
	c.log.Info("blob filled", zap.String("digest", req.Digest), zap.String("registry", req.Registry.Host),
		zap.String("repo", req.Repo), zap.Int64("bytes", p.Size()), zap.Int64("from_upstream", fromUp),
		zap.Int64("from_peers", fromPeers), zap.Int64("from_seed", fromSeed), zap.Duration("elapsed", time.Since(start)))
}

// Running returns the digests of the fills in progress.
func (c *Cache) Running() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	digests := make([]string, 0, len(c.jobs))
	for d := range c.jobs {
		digests = append(digests, d)
	}
	slices.Sort(digests)
	return digests
}

// Close cancels running fills and waits for them to end; their partial
// blobs stay on disk to be resumed.
func (c *Cache) Close() {
	c.mu.Lock()
	c.shut = true
	c.mu.Unlock()
	c.closed.Do(func() { close(c.closing) })
	c.wg.Wait()
}

// fileBlob serves a complete blob's file while re-hashing it, so that a
// file corrupted since it was committed (bit rot, an operator's mistake)
// is never served whole: a read from byte 0 onwards (a whole-blob GET) is
// hashed as it goes, and the read that would return the last byte fails
// instead if the digest is wrong; any other read (a Range) first hashes
// the whole file. A corrupt blob is quarantined, so the next request
// fetches it again. The one exception is the first serve after this
// process committed the blob, of the same unchanged file (ok from the
// start): the commit has just hashed those bytes, and a pull storm's
// clients, which mostly come right after a prefetch, would otherwise pay
// a third SHA-256 pass over every byte.
type fileBlob struct {
	f      *os.File
	size   int64
	digest string
	store  *store.Store

	mu   sync.Mutex
	h    hash.Hash
	next int64 // bytes hashed in order from 0
	ok   bool  // the whole file matched its digest
	bad  error
}

func newFileBlob(f *os.File, size int64, digest string, st *store.Store) *fileBlob {
	return &fileBlob{f: f, size: size, digest: digest, store: st, h: sha256.New()}
}

func (b *fileBlob) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.bad != nil:
		return 0, b.bad
	case b.ok:
		return b.f.ReadAt(p, off)
	case off != b.next:
		if err := b.checkAll(); err != nil {
			return 0, err
		}
		return b.f.ReadAt(p, off)
	}
	n, err := b.f.ReadAt(p, off)
	b.h.Write(p[:n])
	b.next += int64(n)
	if b.next == b.size {
		if err := b.finish(); err != nil {
			return 0, err // withholds the bytes that would complete the blob
		}
	}
	return n, err
}

// checkAll hashes the whole file from 0.
func (b *fileBlob) checkAll() error {
	b.h.Reset()
	b.next = 0
	n, err := io.Copy(b.h, io.NewSectionReader(b.f, 0, b.size))
	if err != nil {
		return fmt.Errorf("verify %s: %w", b.digest, err)
	}
	b.next = n
	return b.finish()
}

// finish compares the hash of the whole file with the digest.
func (b *fileBlob) finish() error {
	got := "sha256:" + hex.EncodeToString(b.h.Sum(nil))
	if b.next == b.size && got == b.digest {
		b.ok = true
		return nil
	}
	b.bad = fmt.Errorf("%w: %s hashes to %s", store.ErrCorrupt, b.digest, got)
	b.store.Quarantine(b.digest, b.bad)
	return b.bad
}

func (b *fileBlob) Size() int64  { return b.size }
func (b *fileBlob) Close() error { return b.f.Close() }

// partialBlob streams a blob that is still being filled. The context is
// the client's request: a reader waits no longer than its client does.
type partialBlob struct {
	p   *store.Partial
	ctx context.Context
}

func (b *partialBlob) ReadAt(p []byte, off int64) (int, error) { return b.p.ReadAt(b.ctx, p, off) }
func (b *partialBlob) Size() int64                             { return b.p.Size() }
func (b *partialBlob) Close() error                            { b.p.Release(); return nil }
