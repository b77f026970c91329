package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"

	"github.com/dgraph-io/badger/v4"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ErrDiskFull means the data disk has no room for a write: a blob that
// does not fit even after evicting what may be evicted, or a metadata
// write that would eat into the space kept for badger.
var ErrDiskFull = errors.New("data disk full")

// DefaultReserve is the free space blob files never take, kept for
// badger. badger writes its write-ahead log, value log and tables through
// memory-mapped sparse files: a page written when the filesystem has no
// block left faults (SIGBUS) instead of returning an error. So blob files
// are allocated up front (fallocate) and only while this much stays free,
// and a metadata write is refused once less than a quarter of it is left:
// badger only ever writes into the reserve, which its largest steps (an
// 8 MiB memtable flushed to a table, a compaction of the small metadata
// tree, a 4 MiB manifest) fit in many times over.
const DefaultReserve = 64 << 20

// free returns the bytes an unprivileged writer may still use on the data
// filesystem.
func (s *Store) free() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", s.dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// metaRoom refuses a metadata write while less than a quarter of the
// reserve is free.
func (s *Store) metaRoom() error {
	if s.reserve <= 0 {
		return nil
	}
	free, err := s.free()
	if err != nil {
		return err
	}
	if floor := s.reserve / 4; free < floor {
		return fmt.Errorf("%w: %d bytes free in %s, metadata writes stop below %d", ErrDiskFull, free, s.dir, floor)
	}
	return nil
}

// update is db.Update after the free-space check.
func (s *Store) update(fn func(txn *badger.Txn) error) error {
	if err := s.metaRoom(); err != nil {
		return err
	}
	return s.db.Update(fn)
}

// allocated returns the bytes the file at path already occupies on disk
// (0 if there is none).
func allocated(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// makeRoom makes need more bytes usable by a blob file while the reserve
// stays free, evicting least recently used complete blobs (never keep) if
// that is what it takes. If evicting every candidate would not be enough
// it evicts nothing and returns ErrDiskFull.
func (s *Store) makeRoom(keep string, need int64) error {
	if s.reserve <= 0 || need <= 0 {
		return nil
	}
	s.roomMu.Lock()
	defer s.roomMu.Unlock()
	free, err := s.free()
	if err != nil {
		return err
	}
	if free-need >= s.reserve {
		return nil
	}
	lru := s.lru(keep)
	var evictable int64
	for _, e := range lru {
		evictable += e.size
	}
	if free+evictable-need < s.reserve {
		return fmt.Errorf("%w: %s needs %d bytes, %d are free in %s (%d kept for metadata), %d more could be evicted",
			ErrDiskFull, keep, need, free, s.dir, s.reserve, evictable)
	}
	for _, e := range lru {
		if s.evictOne(e.digest, "disk full") {
			if free, err = s.free(); err != nil {
				return err
			}
			if free-need >= s.reserve {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: %s needs %d bytes, %d are free in %s (%d kept for metadata) after evicting",
		ErrDiskFull, keep, need, free, s.dir, s.reserve)
}

// allocate gives f its full size on disk now, so that writing it later
// cannot run out of space half-way.
func allocate(f *os.File, size int64) error {
	if size == 0 {
		return f.Truncate(0)
	}
	err := unix.Fallocate(int(f.Fd()), 0, 0, size)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOSPC):
		return fmt.Errorf("%w: allocate %d bytes: %v", ErrDiskFull, size, err)
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOSYS):
		// No fallocate on this filesystem: the free-space check stands alone.
		return f.Truncate(size)
	}
	return fmt.Errorf("allocate %d bytes: %w", size, err)
}

type lruEntry struct {
	digest string
	size   int64
	last   int64
}

// lru lists complete blobs other than keep, least recently used first.
func (s *Store) lru(keep string) []lruEntry {
	var lru []lruEntry
	_ = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBlob), PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var m blobMeta
			if it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &m) }) != nil || !m.Complete {
				continue
			}
			if d := strings.TrimPrefix(string(it.Item().Key()), prefixBlob); d != keep {
				lru = append(lru, lruEntry{d, m.Size, m.LastAccess})
			}
		}
		return nil
	})
	sort.Slice(lru, func(i, j int) bool { return lru[i].last < lru[j].last })
	return lru
}

// evictOne deletes a complete blob to make room and tells OnRemove.
func (s *Store) evictOne(digest, why string) bool {
	if err := s.Delete(digest); err != nil {
		s.log.Warn("evict blob", zap.String("digest", digest), zap.Error(err))
		return false
	}
	s.evicted.Add(1)
	s.log.Info("evicted blob", zap.String("digest", digest), zap.String("why", why), zap.Int64("used", s.Used()), zap.Int64("quota", s.quota))
	s.removed(digest)
	return true
}

// removed calls the OnRemove hook.
func (s *Store) removed(digest string) {
	if s.onRemove != nil {
		s.onRemove(digest)
	}
}
