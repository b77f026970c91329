package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
)

// ErrDigestMismatch means the assembled bytes do not hash to the blob digest.
var ErrDigestMismatch = errors.New("blob digest mismatch")

// ErrComplete means the blob is already complete in the store.
var ErrComplete = errors.New("blob already complete")

// Partial is a blob being filled, shared by its writer (an upstream fetch
// or the swarm) and any readers that stream it while it fills.
type Partial struct {
	s         *Store
	digest    string
	hex       string
	size      int64
	pieceSize int64
	f         *os.File

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every state change
	have    piece.Bitmap  // pieces whose bytes are written (and verified, from the swarm)
	dirty   bool          // have holds pieces not yet recorded as durable

	syncMu   sync.Mutex // serializes fsync + record, commit and discard
	syncedAt time.Time
	retired  bool          // discarded or replaced: must never write its record again
	mark     int64         // bytes [0, mark) are written (maybe not yet durable)
	inline   *piece.Hasher // set when an append started at 0: digest without a re-read
	hashed   bool          // inline saw every byte
	err      error         // terminal failure
	done     bool          // committed: the file is complete and verified
	refs     int
	waiting  map[int]int // piece index -> readers blocked on it

	// The blob digest of a fill that writes pieces (the swarm) is computed
	// as the bytes go by: seq hashes [0, seqAt) in order, from the piece
	// buffers as they are written, reading back from the file only pieces
	// that arrived ahead of the hash. Nil after a resume (bytes written
	// before the restart were never seen): Commit then reads the file.
	hashMu sync.Mutex
	seq    hash.Hash
	seqAt  int64
	reread int64 // bytes read back from the file to compute the digest
}

func (p *Partial) lock()   { p.mu.Lock() }
func (p *Partial) unlock() { p.mu.Unlock() }

// notify wakes every waiter; callers hold the lock.
func (p *Partial) notify() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// OpenPartial returns the partial blob for digest, sharing it with anyone
// who already has it open, resuming it from disk after a restart, or
// creating it. Each call must be paired with Release.
func (s *Store) OpenPartial(digest string, size, pieceSize int64) (*Partial, error) {
	hexd, err := hexOf(digest)
	if err != nil {
		return nil, err
	}
	if size < 0 {
		return nil, fmt.Errorf("open partial %s: negative size", digest)
	}
	if pieceSize <= 0 {
		pieceSize = piece.DefaultSize
	}
	// A blob file takes its whole size on disk at once (see allocate):
	// make room for it first, evicting if need be, outside s.mu.
	s.mu.Lock()
	_, live := s.partials[digest]
	s.mu.Unlock()
	if !live && !s.Has(digest) {
		if err := s.makeRoom(digest, size-allocated(s.partialPath(hexd))); err != nil {
			return nil, fmt.Errorf("open partial %s: %w", digest, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.partials[digest]; ok {
		p.lock()
		failed := p.err != nil
		if !failed && p.size == size {
			p.refs++
		}
		p.unlock()
		if !failed {
			if p.size != size {
				return nil, fmt.Errorf("open partial %s: size %d, but %d is already being fetched", digest, size, p.size)
			}
			return p, nil
		}
		// A failed fill still read by someone: its readers keep it, the new
		// fill gets a fresh Partial, and the old one may no longer record.
		p.retire()
		delete(s.partials, digest)
	}
	m, err := s.getMeta(digest)
	switch {
	case err == nil && m.Complete:
		return nil, ErrComplete
	case err == nil && m.Size == size && m.PieceSize == pieceSize:
		// resume below
	case err == nil || errors.Is(err, ErrNotFound):
		m = blobMeta{Size: size, PieceSize: pieceSize}
	default:
		return nil, err
	}
	n := piece.Count(size, pieceSize)
	have := piece.NewBitmap(n)
	if len(m.Have) > 0 {
		if have, err = piece.BitmapFromBytes(n, m.Have); err != nil {
			s.log.Warn("discarding corrupt piece bitmap", zap.String("digest", digest), zap.Error(err))
			have = piece.NewBitmap(n)
		}
	}
	path := s.partialPath(hexd)
	if _, err := os.Stat(path); err != nil && have.Count() > 0 {
		// A record without its file: nothing recorded can be trusted.
		have = piece.NewBitmap(n)
	}
	flags := os.O_RDWR | os.O_CREATE
	if have.Count() == 0 {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open partial file for %s: %w", digest, err)
	}
	if err := allocate(f, size); err != nil {
		f.Close()
		if have.Count() == 0 {
			_ = os.Remove(path)
		}
		return nil, fmt.Errorf("size partial file for %s: %w", digest, err)
	}
	m.Have = have.Bytes()
	m.LastAccess = s.now().Unix()
	if err := s.putMeta(digest, m); err != nil {
		f.Close()
		return nil, err
	}
	p := &Partial{
		s: s, digest: digest, hex: hexd, size: size, pieceSize: pieceSize, f: f,
		changed: make(chan struct{}), have: have, refs: 1,
		waiting: map[int]int{},
	}
	if have.Count() == 0 {
		p.seq = sha256.New()
	}
	p.mark = p.contiguous()
	if have.Count() > 0 {
		s.log.Info("resuming partial blob", zap.String("digest", digest), zap.Int("pieces", have.Count()), zap.Int("of", n))
	}
	s.partials[digest] = p
	return p, nil
}

// contiguous returns the end of the run of durable pieces from offset 0.
func (p *Partial) contiguous() int64 {
	n := p.have.Len()
	i := 0
	for i < n && p.have.Has(i) {
		i++
	}
	if i == n {
		return p.size
	}
	return int64(i) * p.pieceSize
}

// Retain adds a reference for another reader; pair it with Release.
func (p *Partial) Retain() {
	p.lock()
	p.refs++
	p.unlock()
}

// Release drops one reference; the last one closes the file.
func (p *Partial) Release() {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	p.lock()
	p.refs--
	last := p.refs == 0
	p.unlock()
	if !last {
		return
	}
	if p.s.partials[p.digest] == p {
		delete(p.s.partials, p.digest)
	}
	if err := p.sync(true); err != nil {
		p.s.log.Warn("record progress of partial blob", zap.String("digest", p.digest), zap.Error(err))
	}
	p.f.Close()
}

// Digest returns the blob digest.
func (p *Partial) Digest() string { return p.digest }

// Size returns the blob size.
func (p *Partial) Size() int64 { return p.size }

// PieceSize returns the piece size the partial is laid out in.
func (p *Partial) PieceSize() int64 { return p.pieceSize }

// Have returns a copy of the durable-piece bitmap.
func (p *Partial) Have() piece.Bitmap {
	p.lock()
	defer p.unlock()
	b, _ := piece.BitmapFromBytes(p.have.Len(), p.have.Bytes())
	return b
}

// Changed returns a channel closed at the next state change.
func (p *Partial) Changed() <-chan struct{} {
	p.lock()
	defer p.unlock()
	return p.changed
}

// Waiting returns the lowest piece a reader is blocked on, or -1: the swarm
// fetches it first so that the HTTP response keeps streaming.
func (p *Partial) Waiting() int {
	p.lock()
	defer p.unlock()
	low := -1
	for i := range p.waiting {
		if low < 0 || i < low {
			low = i
		}
	}
	return low
}

// Err returns the terminal error, if the fill failed.
func (p *Partial) Err() error {
	p.lock()
	defer p.unlock()
	return p.err
}

// WritePiece stores piece i, which the caller has verified, and records it
// once it is durable.
func (p *Partial) WritePiece(i int, data []byte) error {
	off, length := piece.Bounds(i, p.size, p.pieceSize)
	if int64(len(data)) != length {
		return fmt.Errorf("write piece %d of %s: %d bytes, want %d", i, p.digest, len(data), length)
	}
	if _, err := p.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("write piece %d of %s: %w", i, p.digest, err)
	}
	p.lock()
	p.have.Set(i)
	p.dirty = true
	if end := p.contiguous(); end > p.mark {
		p.mark = end
	}
	p.notify()
	p.unlock()
	if err := p.hashAlong(off, data); err != nil {
		return err
	}
	return p.sync(false)
}

// hashAlong feeds the digest with data, just written at off, if the hash
// has reached off, and then with every piece already written after it
// (read back from the file: they arrived ahead of the hash).
func (p *Partial) hashAlong(off int64, data []byte) error {
	p.hashMu.Lock()
	defer p.hashMu.Unlock()
	if p.seq == nil || off != p.seqAt {
		return nil
	}
	p.seq.Write(data)
	p.seqAt += int64(len(data))
	for p.seqAt < p.size {
		i := piece.Index(p.seqAt, p.pieceSize)
		p.lock()
		ahead := p.have.Has(i)
		p.unlock()
		if !ahead {
			return nil
		}
		pieceOff, length := piece.Bounds(i, p.size, p.pieceSize)
		if err := p.hashFromFile(pieceOff + length); err != nil {
			return err
		}
	}
	return nil
}

// hashFromFile feeds the digest with the file's bytes [seqAt, end); the
// caller holds hashMu.
func (p *Partial) hashFromFile(end int64) error {
	buf := p.s.rereadBuf()
	defer p.s.rereadBufs.Put(buf)
	n, err := io.CopyBuffer(p.seq, io.NewSectionReader(p.f, p.seqAt, end-p.seqAt), *buf)
	p.seqAt += n
	p.reread += n
	if err != nil {
		return fmt.Errorf("hash %s at %d: %w", p.digest, p.seqAt, err)
	}
	return nil
}

// syncInterval is how often written pieces are made durable and recorded.
// One fsync per piece cost more than the piece transfer itself; a crash
// loses at most this much progress, never correctness: only pieces written
// before an fsync are recorded.
const syncInterval = 500 * time.Millisecond

// sync makes the written pieces durable and records them in badger, at
// most once per syncInterval unless forced.
func (p *Partial) sync(force bool) error {
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	p.lock()
	if !p.dirty || p.done || p.retired || (!force && time.Since(p.syncedAt) < syncInterval) {
		p.unlock()
		return nil
	}
	snapshot := p.have.Bytes()
	p.dirty = false
	p.unlock()
	if err := p.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", p.digest, err)
	}
	p.syncedAt = time.Now()
	return p.s.putMeta(p.digest, blobMeta{Size: p.size, PieceSize: p.pieceSize, Have: snapshot, LastAccess: p.s.now().Unix()})
}

// Append fills the blob sequentially from the first missing byte with r,
// which must yield the blob's bytes from that offset (an upstream response,
// possibly to a Range request). Readers see bytes as soon as they are
// written; pieces are recorded as they become durable. When the fill starts
// at 0, piece CIDs and the digest are computed on the way, and onPiece (if
// not nil) hears of each piece as it completes.
func (p *Partial) Append(r io.Reader, onPiece func(i int, c cid.Cid)) error {
	start := p.Offset()
	if start == 0 {
		p.inline = piece.NewHasher(p.size, p.pieceSize, onPiece)
	}
	buf := make([]byte, 256<<10)
	off := start
	next := piece.Index(start, p.pieceSize) // next piece to record
	for off < p.size {
		want := min(int64(len(buf)), p.size-off)
		n, err := io.ReadFull(r, buf[:want])
		if n > 0 {
			if _, werr := p.f.WriteAt(buf[:n], off); werr != nil {
				return fmt.Errorf("write %s at %d: %w", p.digest, off, werr)
			}
			if p.inline != nil {
				if _, herr := p.inline.Write(buf[:n]); herr != nil {
					return fmt.Errorf("hash %s: %w", p.digest, herr)
				}
			} else if herr := p.hashAlong(off, buf[:n]); herr != nil {
				return herr
			}
			off += int64(n)
			if err := p.advance(off, &next); err != nil {
				return err
			}
		}
		if err != nil {
			return fmt.Errorf("read %s at %d of %d: %w", p.digest, off, p.size, err)
		}
	}
	p.hashed = start == 0
	return nil
}

// Offset returns the first byte an appender should write.
func (p *Partial) Offset() int64 {
	p.lock()
	defer p.unlock()
	return p.mark
}

// advance publishes bytes up to off and records the pieces they complete.
func (p *Partial) advance(off int64, next *int) error {
	count := p.have.Len()
	complete := *next
	for complete < count {
		pieceOff, length := piece.Bounds(complete, p.size, p.pieceSize)
		if pieceOff+length > off {
			break
		}
		complete++
	}
	p.lock()
	for ; *next < complete; *next++ {
		p.have.Set(*next)
		p.dirty = true
	}
	if off > p.mark {
		p.mark = off
	}
	p.notify()
	p.unlock()
	return p.sync(false)
}

// available reports whether [off, off+n) can be read; callers hold the lock.
//
// The last byte is held back until the blob is committed, so a client never
// receives a whole blob whose digest turned out wrong: its response is cut
// short instead.
func (p *Partial) available(off, n int64) bool {
	if p.done {
		return true
	}
	if off+n >= p.size {
		return false
	}
	if off+n <= p.mark {
		return true
	}
	for i := piece.Index(off, p.pieceSize); i <= piece.Index(off+n-1, p.pieceSize); i++ {
		if !p.have.Has(i) {
			return false
		}
	}
	return true
}

// ReadAt reads len(b) bytes at off (fewer only at the end of the blob, with
// io.EOF), waiting until they are written, the fill fails, or ctx ends.
func (p *Partial) ReadAt(ctx context.Context, b []byte, off int64) (int, error) {
	if off >= p.size {
		return 0, io.EOF
	}
	want := min(int64(len(b)), p.size-off)
	if want == 0 {
		return 0, nil
	}
	registered := -1
	defer func() {
		if registered >= 0 {
			p.lock()
			if p.waiting[registered]--; p.waiting[registered] <= 0 {
				delete(p.waiting, registered)
			}
			p.unlock()
		}
	}()
	for {
		p.lock()
		if p.err != nil {
			err := p.err
			p.unlock()
			return 0, err
		}
		if p.available(off, want) {
			p.unlock()
			break
		}
		if registered < 0 {
			registered = p.firstMissing(off, want)
			p.waiting[registered]++
			p.notify() // the swarm re-plans around the reader's position
		}
		ch := p.changed
		p.unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, fmt.Errorf("wait for %s at %d: %w", p.digest, off, ctx.Err())
		}
	}
	n, err := p.f.ReadAt(b[:want], off)
	if err != nil {
		return n, fmt.Errorf("read %s at %d: %w", p.digest, off, err)
	}
	if want < int64(len(b)) {
		return n, io.EOF
	}
	return n, nil
}

func (p *Partial) firstMissing(off, n int64) int {
	for i := piece.Index(off, p.pieceSize); i <= piece.Index(off+n-1, p.pieceSize); i++ {
		if !p.have.Has(i) {
			return i
		}
	}
	return piece.Index(off, p.pieceSize)
}

// Fail ends the fill with err: blocked readers get it. The durable pieces
// stay on disk so that a later fill resumes.
func (p *Partial) Fail(err error) {
	p.lock()
	defer p.unlock()
	if p.err == nil && !p.done {
		p.err = err
		p.notify()
	}
}

// Commit checks that every piece is present and the digest matches, then
// moves the file into place. On a mismatch the partial is discarded whole.
func (p *Partial) Commit() error {
	p.lock()
	if p.done {
		p.unlock()
		return nil
	}
	if p.err != nil {
		err := p.err
		p.unlock()
		return err
	}
	if p.mark < p.size && !p.have.Complete() {
		p.unlock()
		return fmt.Errorf("commit %s: only %d of %d pieces present", p.digest, p.have.Count(), p.have.Len())
	}
	p.unlock()

	got, err := p.digestOf()
	if err != nil {
		return err
	}
	if got != p.digest {
		err := fmt.Errorf("commit %s: content hashes to %s: %w", p.digest, got, ErrDigestMismatch)
		p.Fail(err)
		p.discard()
		return err
	}
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	if err := p.f.Sync(); err != nil {
		return fmt.Errorf("commit %s: sync: %w", p.digest, err)
	}
	if err := os.Rename(p.s.partialPath(p.hex), p.s.blobPath(p.hex)); err != nil {
		return fmt.Errorf("commit %s: %w", p.digest, err)
	}
	if err := p.s.putMeta(p.digest, blobMeta{Size: p.size, PieceSize: p.pieceSize, Complete: true, LastAccess: p.s.now().Unix()}); err != nil {
		return err
	}
	id, idErr := idOf(p.f)
	p.s.mu.Lock()
	p.s.used += p.size
	if p.s.partials[p.digest] == p {
		delete(p.s.partials, p.digest)
	}
	if idErr == nil {
		p.s.fresh[p.digest] = id
	}
	p.s.mu.Unlock()
	p.lock()
	p.done = true
	p.notify()
	p.unlock()
	p.s.evict(p.digest)
	return nil
}

// digestOf uses the inline hash when the whole blob went through Append
// from 0, and re-reads the file otherwise (pieces from the swarm, resumes).
func (p *Partial) digestOf() (string, error) {
	if p.hashed {
		return p.inline.Digest(), nil
	}
	p.hashMu.Lock()
	defer p.hashMu.Unlock()
	if p.seq == nil {
		p.seq, p.seqAt = sha256.New(), 0
	}
	// Whatever the hash has not seen yet (all of it after a resume; a
	// stretch an appender wrote) is read back from the file.
	if err := p.hashFromFile(p.size); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(p.seq.Sum(nil)), nil
}

// Reread returns how many bytes were read back from the file to compute
// the blob digest (zero when every byte was hashed as it was written).
func (p *Partial) Reread() int64 {
	p.hashMu.Lock()
	defer p.hashMu.Unlock()
	return p.reread
}

// retire stops the partial from ever writing its record again.
func (p *Partial) retire() {
	p.lock()
	p.retired = true
	p.unlock()
}

// Restart forgets every piece, so that a writer that must see every byte
// (the seed, which hashes from byte 0) starts over.
func (p *Partial) Restart() error {
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	p.lock()
	p.have = piece.NewBitmap(p.have.Len())
	p.mark, p.dirty, p.err, p.hashed = 0, false, nil, false
	p.notify()
	p.unlock()
	p.hashMu.Lock()
	p.seq, p.seqAt = sha256.New(), 0
	p.hashMu.Unlock()
	return p.s.putMeta(p.digest, blobMeta{Size: p.size, PieceSize: p.pieceSize, LastAccess: p.s.now().Unix()})
}

// discard deletes the partial file and its record: its bytes are wrong.
func (p *Partial) discard() {
	p.retire()
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	if err := os.Remove(p.s.partialPath(p.hex)); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.s.log.Warn("remove bad partial", zap.String("digest", p.digest), zap.Error(err))
	}
	if err := p.s.deleteMeta(p.digest); err != nil {
		p.s.log.Warn("remove bad partial record", zap.String("digest", p.digest), zap.Error(err))
	}
	p.s.mu.Lock()
	if p.s.partials[p.digest] == p {
		delete(p.s.partials, p.digest)
	}
	p.s.mu.Unlock()
}
