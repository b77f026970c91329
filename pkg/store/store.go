// Package store keeps blobs on disk and their metadata in badger.
//
// A complete blob lives at <dir>/blobs/sha256/<hex>; it got there by a
// rename after its digest was verified and its bytes were synced, so any
// file in that directory may be served as it is. A blob being fetched lives
// at <dir>/partial/sha256/<hex>, written in place at piece offsets; a piece
// is recorded in badger only after its bytes are durable, so a restart
// resumes from the recorded pieces and never trusts anything else.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
)

// ErrNotFound means the store has no complete blob (or record) for a key.
var ErrNotFound = errors.New("not found")

// Options configures a Store.
type Options struct {
	// Dir holds blobs/, partial/ and meta/ (badger).
	Dir string
	// QuotaBytes caps the bytes of complete blobs; least recently used blobs
	// are evicted past it. 0 means no cap.
	QuotaBytes int64
	// Now is the clock (for LRU times); nil means time.Now.
	Now func() time.Time
	// ReserveBytes is the free space on the data filesystem that blob
	// files never take, kept for badger's metadata writes (see
	// DefaultReserve, the value 0 selects). Negative: no reserve and no
	// free-space checks.
	ReserveBytes int64
	// OnRemove, when set, is called with the digest of a complete blob
	// after it was evicted or quarantined (never for a commit), outside the
	// store's locks; it must not block (the agent withdraws the blob from
	// the swarm, the supernode stops seeding it).
	OnRemove func(digest string)
}

// Store is the blob and metadata store of one agent or supernode.
type Store struct {
	dir      string
	db       *badger.DB
	quota    int64
	reserve  int64
	onRemove func(digest string)
	now      func() time.Time
	log      *zap.Logger

	mu       sync.Mutex
	partials map[string]*Partial // live partial blobs by digest
	fresh    map[string]fileID   // blobs committed by this process, not opened since (see TakeFresh)
	// rereadBufs are the read buffers of Partial.hashFromFile: pieces that
	// arrived ahead of the blob hash (most of them, in a swarm) are read
	// back in 256 KiB reads, not io.Copy's 32 KiB.
	rereadBufs sync.Pool
	used       int64        // bytes of complete blobs
	deleteMu   sync.Mutex   // one Delete at a time: check, remove and count as one step
	evicted    atomic.Int64 // blobs evicted to keep the quota or make room (for metrics)
	roomMu     sync.Mutex   // one makeRoom at a time: check, evict and allocate as one step
}

// blobMeta is the badger record of one blob.
type blobMeta struct {
	Size       int64  `json:"size"`
	PieceSize  int64  `json:"piece_size"`
	Complete   bool   `json:"complete"`
	Have       []byte `json:"have,omitempty"` // piece bitmap while partial
	LastAccess int64  `json:"last_access"`    // unix seconds
}

const (
	prefixBlob     = "b/"
	prefixMetainfo = "i/"
	prefixManifest = "m/"
	prefixTag      = "t/"
)

// Open opens (or creates) a store in opts.Dir and reconciles the metadata
// with the files found there after a crash.
func Open(opts Options, log *zap.Logger) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("open store: no directory")
	}
	for _, d := range []string{"blobs/sha256", "partial/sha256", "meta"} {
		if err := os.MkdirAll(filepath.Join(opts.Dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
	}
	bopts := badger.DefaultOptions(filepath.Join(opts.Dir, "meta")).
		WithLogger(badgerLogger{log.Sugar()}).
		// Metadata is tiny: keep badger's memory small so that an agent's
		// footprint is dominated by in-flight pieces, not caches.
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithBlockCacheSize(8 << 20).
		WithIndexCacheSize(4 << 20).
		WithValueLogFileSize(64 << 20).
		WithNumCompactors(2)
	db, err := badger.Open(bopts)
	if err != nil {
		return nil, fmt.Errorf("open badger in %s: %w", opts.Dir, err)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	reserve := opts.ReserveBytes
	if reserve == 0 {
		reserve = DefaultReserve
	}
	s := &Store{dir: opts.Dir, db: db, quota: opts.QuotaBytes, reserve: reserve, onRemove: opts.OnRemove, now: now, log: log,
		partials: map[string]*Partial{}, fresh: map[string]fileID{}}
	if err := s.recover(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the metadata database. Live partials must be released first.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close badger: %w", err)
	}
	return nil
}

func hexOf(digest string) (string, error) {
	hex, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return "", fmt.Errorf("digest %q is not sha256:<64 lowercase hex>", digest)
	}
	return hex, nil
}

func (s *Store) blobPath(hex string) string    { return filepath.Join(s.dir, "blobs", "sha256", hex) }
func (s *Store) partialPath(hex string) string { return filepath.Join(s.dir, "partial", "sha256", hex) }

// recover makes badger agree with the files: complete records need their
// file, partial records their partial file; files in blobs/ without a record
// were renamed (so verified) just before a crash and get one; partial files
// without a record are deleted.
func (s *Store) recover() error {
	metas := map[string]blobMeta{}
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBlob), PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var m blobMeta
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &m) }); err != nil {
				return err
			}
			metas[strings.TrimPrefix(string(it.Item().Key()), prefixBlob)] = m
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("recover store: read metadata: %w", err)
	}
	for digest, m := range metas {
		hex, err := hexOf(digest)
		if err != nil {
			_ = s.deleteMeta(digest)
			continue
		}
		path := s.partialPath(hex)
		if m.Complete {
			path = s.blobPath(hex)
		}
		st, err := os.Stat(path)
		if err != nil || st.Size() != m.Size {
			s.log.Warn("dropping blob record without matching file", zap.String("digest", digest), zap.Bool("complete", m.Complete))
			_ = os.Remove(path)
			if err := s.deleteMeta(digest); err != nil {
				return err
			}
			delete(metas, digest)
			continue
		}
		if m.Complete {
			s.used += m.Size
		}
	}
	blobs, _ := os.ReadDir(filepath.Join(s.dir, "blobs", "sha256"))
	for _, e := range blobs {
		digest := "sha256:" + e.Name()
		if m, ok := metas[digest]; ok && m.Complete {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		_ = os.Remove(s.partialPath(e.Name()))
		if err := s.putMeta(digest, blobMeta{Size: info.Size(), Complete: true, LastAccess: s.now().Unix()}); err != nil {
			return err
		}
		s.used += info.Size()
	}
	partials, _ := os.ReadDir(filepath.Join(s.dir, "partial", "sha256"))
	for _, e := range partials {
		if m, ok := metas["sha256:"+e.Name()]; !ok || m.Complete {
			_ = os.Remove(filepath.Join(s.dir, "partial", "sha256", e.Name()))
		}
	}
	return nil
}

func (s *Store) getMeta(digest string) (blobMeta, error) {
	var m blobMeta
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte(prefixBlob + digest))
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error { return json.Unmarshal(v, &m) })
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return m, ErrNotFound
	}
	if err != nil {
		return m, fmt.Errorf("read record of %s: %w", digest, err)
	}
	return m, nil
}

func (s *Store) putMeta(digest string, m blobMeta) error {
	v, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if err := s.update(func(txn *badger.Txn) error { return txn.Set([]byte(prefixBlob+digest), v) }); err != nil {
		return fmt.Errorf("write record of %s: %w", digest, err)
	}
	return nil
}

// deleteMeta runs even on a full disk (no free-space check): the caller
// has removed the file first, and a delete is a few bytes of log.
func (s *Store) deleteMeta(digest string) error {
	err := s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Delete([]byte(prefixBlob + digest)); err != nil {
			return err
		}
		return txn.Delete([]byte(prefixMetainfo + digest))
	})
	if err != nil {
		return fmt.Errorf("delete record of %s: %w", digest, err)
	}
	return nil
}

// Open returns the complete blob's file and size, or ErrNotFound. It counts
// as a use for LRU eviction.
func (s *Store) Open(digest string) (*os.File, int64, error) { return s.open(digest, true) }

// open is Open; touch says whether it counts as a use (a scrub's read
// does not).
func (s *Store) open(digest string, touch bool) (*os.File, int64, error) {
	hex, err := hexOf(digest)
	if err != nil {
		return nil, 0, err
	}
	m, err := s.getMeta(digest)
	if err != nil {
		return nil, 0, err
	}
	if !m.Complete {
		return nil, 0, ErrNotFound
	}
	f, err := os.Open(s.blobPath(hex))
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, ErrNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("open blob %s: %w", digest, err)
	}
	// Rewriting the record on every read would make badger the bottleneck
	// of warm serving; minute resolution is plenty for LRU.
	if now := s.now().Unix(); touch && now-m.LastAccess >= 60 {
		m.LastAccess = now
		if err := s.putMeta(digest, m); err != nil {
			s.log.Warn("update last access", zap.String("digest", digest), zap.Error(err))
		}
	}
	return f, m.Size, nil
}

func (s *Store) rereadBuf() *[]byte {
	if b, ok := s.rereadBufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 256<<10)
	return &b
}

// Has reports whether the blob is complete in the store.
func (s *Store) Has(digest string) bool {
	m, err := s.getMeta(digest)
	return err == nil && m.Complete
}

// Used returns the bytes held by complete blobs.
func (s *Store) Used() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used
}

// Delete removes a complete blob. Readers that have it open keep reading.
func (s *Store) Delete(digest string) error {
	hex, err := hexOf(digest)
	if err != nil {
		return err
	}
	s.deleteMu.Lock()
	defer s.deleteMu.Unlock()
	m, err := s.getMeta(digest)
	if err != nil {
		return err
	}
	if !m.Complete {
		return fmt.Errorf("delete %s: still being fetched", digest)
	}
	if err := os.Remove(s.blobPath(hex)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete blob %s: %w", digest, err)
	}
	if err := s.deleteMeta(digest); err != nil {
		return err
	}
	s.mu.Lock()
	s.used -= m.Size
	delete(s.fresh, digest)
	s.mu.Unlock()
	return nil
}

// evict deletes least recently used complete blobs until the quota holds,
// sparing keep (the blob that was just committed).
func (s *Store) evict(keep string) {
	if s.quota <= 0 || s.Used() <= s.quota {
		return
	}
	for _, e := range s.lru(keep) {
		if s.Used() <= s.quota {
			return
		}
		s.evictOne(e.digest, "over quota")
	}
}

// Evictions counts blobs deleted to keep the quota since Open.
func (s *Store) Evictions() int64 { return s.evicted.Load() }

// Ready reports whether the store can serve: nil while its database is open.
func (s *Store) Ready() error {
	if s.db.IsClosed() {
		return errors.New("store is closed")
	}
	return nil
}

// PutMetainfo records a blob's piece table (from the seed, or computed here).
func (s *Store) PutMetainfo(m *piece.Metainfo) error {
	v, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode metainfo of %s: %w", m.Digest, err)
	}
	if err := s.update(func(txn *badger.Txn) error { return txn.Set([]byte(prefixMetainfo+m.Digest), v) }); err != nil {
		return fmt.Errorf("write metainfo of %s: %w", m.Digest, err)
	}
	return nil
}

// Metainfo returns a recorded piece table, or ErrNotFound.
func (s *Store) Metainfo(digest string) (*piece.Metainfo, error) {
	var m piece.Metainfo
	if err := s.get(prefixMetainfo+digest, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// Manifest is a cached manifest.
type Manifest struct {
	MediaType string `json:"media_type"`
	Body      []byte `json:"body"`
}

// PutManifest caches a manifest by its (already verified) digest.
func (s *Store) PutManifest(digest string, m Manifest) error {
	return s.put(prefixManifest+digest, m)
}

// Manifest returns a cached manifest, or ErrNotFound.
func (s *Store) Manifest(digest string) (Manifest, error) {
	var m Manifest
	err := s.get(prefixManifest+digest, &m)
	return m, err
}

// PutTag remembers what a tag last resolved to, for use while the
// upstream is down.
func (s *Store) PutTag(registry, repo, tag, digest string) error {
	return s.put(prefixTag+registry+"/"+repo+":"+tag, digest)
}

// Tag returns the digest a tag last resolved to, or ErrNotFound.
func (s *Store) Tag(registry, repo, tag string) (string, error) {
	var d string
	err := s.get(prefixTag+registry+"/"+repo+":"+tag, &d)
	return d, err
}

func (s *Store) put(key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	if err := s.update(func(txn *badger.Txn) error { return txn.Set([]byte(key), b) }); err != nil {
		return fmt.Errorf("write %s: %w", key, err)
	}
	return nil
}

func (s *Store) get(key string, v any) error {
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte(key))
		if err != nil {
			return err
		}
		return item.Value(func(b []byte) error { return json.Unmarshal(b, v) })
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", key, err)
	}
	return nil
}

// badgerLogger routes badger's own logging into zap; badger is chatty at
// info, so that goes to debug.
type badgerLogger struct{ l *zap.SugaredLogger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Errorf(strings.TrimSpace(f), a...) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warnf(strings.TrimSpace(f), a...) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debugf(strings.TrimSpace(f), a...) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Debugf(strings.TrimSpace(f), a...) }

// Pending returns the geometry of a partial blob recorded on disk, so a
// fill can resume it.
func (s *Store) Pending(digest string) (size, pieceSize int64, ok bool) {
	m, err := s.getMeta(digest)
	if err != nil || m.Complete {
		return 0, 0, false
	}
	return m.Size, m.PieceSize, true
}

// PieceReader opens piece i (of pieceSize) of a blob for a peer: from the
// complete file, or from a partial blob that has the piece durable. The
// caller closes it.
func (s *Store) PieceReader(digest string, i int, pieceSize int64) (io.ReadCloser, int64, error) {
	s.mu.Lock()
	p, live := s.partials[digest]
	if live {
		p.Retain()
	}
	s.mu.Unlock()
	if live {
		p.lock()
		ok := p.pieceSize == pieceSize && (p.done || p.have.Has(i))
		p.unlock()
		if !ok {
			p.Release()
			return nil, 0, ErrNotFound
		}
		off, n := piece.Bounds(i, p.size, p.pieceSize)
		return &pieceReader{SectionReader: io.NewSectionReader(p.f, off, n), close: func() error { p.Release(); return nil }}, n, nil
	}
	f, size, err := s.Open(digest)
	if err != nil {
		return nil, 0, err
	}
	off, n := piece.Bounds(i, size, pieceSize)
	if n == 0 {
		f.Close()
		return nil, 0, fmt.Errorf("piece %d of %s: out of range", i, digest)
	}
	return &pieceReader{SectionReader: io.NewSectionReader(f, off, n), close: f.Close}, n, nil
}

// HaveBitmap returns which pieces (of pieceSize) of a blob this store can
// serve to peers, as piece.Bitmap bytes, or false when it holds none of
// it in that geometry.
func (s *Store) HaveBitmap(digest string, pieceSize int64) ([]byte, bool) {
	have, _, ok := s.HaveWatch(digest, pieceSize)
	return have, ok
}

// HaveWatch is HaveBitmap with a channel closed at the blob's next state
// change while it fills (nil once every piece is here: the bitmap will not
// change again).
func (s *Store) HaveWatch(digest string, pieceSize int64) ([]byte, <-chan struct{}, bool) {
	s.mu.Lock()
	p, live := s.partials[digest]
	if live {
		p.Retain()
	}
	s.mu.Unlock()
	if live {
		defer p.Release()
		p.lock()
		defer p.unlock()
		if p.pieceSize != pieceSize {
			return nil, nil, false
		}
		if !p.done && !p.have.Complete() {
			return p.have.Bytes(), p.changed, true
		}
		return allPieces(p.size, pieceSize), nil, true
	}
	m, err := s.getMeta(digest)
	if err != nil || !m.Complete {
		return nil, nil, false
	}
	return allPieces(m.Size, pieceSize), nil, true
}

func allPieces(size, pieceSize int64) []byte {
	n := piece.Count(size, pieceSize)
	b := piece.NewBitmap(n)
	for i := range n {
		b.Set(i)
	}
	return b.Bytes()
}

type pieceReader struct {
	*io.SectionReader
	close func() error
}

func (r *pieceReader) Close() error { return r.close() }

// DiscardPartial removes a partial blob that nobody has open.
func (s *Store) DiscardPartial(digest string) {
	hex, err := hexOf(digest)
	if err != nil {
		return
	}
	s.mu.Lock()
	_, live := s.partials[digest]
	s.mu.Unlock()
	if m, err := s.getMeta(digest); live || err != nil || m.Complete {
		return
	}
	_ = os.Remove(s.partialPath(hex))
	_ = s.deleteMeta(digest)
}
