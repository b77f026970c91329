package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

const pieceSize = 64 << 10

func blobOf(t *testing.T, n int) ([]byte, string) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return b, "sha256:" + hex.EncodeToString(sum[:])
}

func open(t *testing.T, dir string, quota int64, now func() time.Time) *Store {
	t.Helper()
	s, err := Open(Options{Dir: dir, QuotaBytes: quota, Now: now}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readAll(t *testing.T, s *Store, digest string) []byte {
	t.Helper()
	f, size, err := s.Open(digest)
	if err != nil {
		t.Fatalf("open %s: %v", digest, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil || int64(len(b)) != size {
		t.Fatalf("read %s: %d of %d bytes, %v", digest, len(b), size, err)
	}
	return b
}

func TestAppendCommitServe(t *testing.T) {
	s := open(t, t.TempDir(), 0, nil)
	defer s.Close()
	blob, digest := blobOf(t, 3*pieceSize+123)
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	p.Release()
	if !bytes.Equal(readAll(t, s, digest), blob) {
		t.Fatal("served bytes differ")
	}
	if s.Used() != int64(len(blob)) {
		t.Fatalf("used %d, want %d", s.Used(), len(blob))
	}
}

// A restart resumes from the pieces recorded as durable.
func TestResumeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	blob, digest := blobOf(t, 4*pieceSize+10)
	s := open(t, dir, 0, nil)
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 1, 3} {
		if err := p.WritePiece(i, blob[i*pieceSize:(i+1)*pieceSize]); err != nil {
			t.Fatal(err)
		}
	}
	p.Release()
	s.Close()

	s = open(t, dir, 0, nil)
	defer s.Close()
	size, ps, ok := s.Pending(digest)
	if !ok || size != int64(len(blob)) || ps != pieceSize {
		t.Fatalf("Pending = %d, %d, %v", size, ps, ok)
	}
	p, err = s.OpenPartial(digest, size, ps)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	if have := p.Have(); have.Count() != 3 || !have.Has(3) || have.Has(2) {
		t.Fatalf("resumed with %d pieces", have.Count())
	}
	if off := p.Offset(); off != 2*pieceSize {
		t.Fatalf("resume offset %d, want %d", off, 2*pieceSize)
	}
	if err := p.Append(bytes.NewReader(blob[2*pieceSize:]), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, s, digest), blob) {
		t.Fatal("resumed blob differs")
	}
}

// Bytes that do not match the digest are never served whole: the reader
// of the last byte gets an error, and nothing is left in the store.
func TestDigestMismatchIsNeverServed(t *testing.T) {
	s := open(t, t.TempDir(), 0, nil)
	defer s.Close()
	blob, digest := blobOf(t, 2*pieceSize)
	bad := append([]byte(nil), blob...)
	bad[len(bad)-1] ^= 0xff
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, len(blob))
		_, err := p.ReadAt(context.Background(), buf, 0)
		readErr <- err
	}()
	if err := p.Append(bytes.NewReader(bad), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("commit: %v, want digest mismatch", err)
	}
	if err := <-readErr; !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("reader got %v, want digest mismatch", err)
	}
	if _, _, err := s.Open(digest); !errors.Is(err, ErrNotFound) {
		t.Fatalf("open after mismatch: %v", err)
	}
	if _, _, ok := s.Pending(digest); ok {
		t.Fatal("bad partial still recorded")
	}
	hexd, _ := hexOf(digest)
	if _, err := os.Stat(s.partialPath(hexd)); !os.IsNotExist(err) {
		t.Fatalf("bad partial file still on disk: %v", err)
	}
}

func TestReaderWaitsForPieces(t *testing.T) {
	s := open(t, t.TempDir(), 0, nil)
	defer s.Close()
	blob, digest := blobOf(t, 3*pieceSize)
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, 100)
		if _, err := p.ReadAt(context.Background(), buf, pieceSize+10); err != nil {
			t.Error(err)
		}
		got <- buf
	}()
	// The reader is blocked on piece 1 until it is written.
	for {
		ch := p.Changed()
		if p.Waiting() == 1 {
			break
		}
		<-ch
	}
	if err := p.WritePiece(1, blob[pieceSize:2*pieceSize]); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, blob[pieceSize+10:pieceSize+110]) {
		t.Fatal("reader got wrong bytes")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled reader: %v", err)
	}
}

// Recovery trusts files in blobs/ (only verified blobs are renamed there)
// and drops records whose files are gone and partial files with no record.
func TestRecoveryReconcilesFilesAndRecords(t *testing.T) {
	dir := t.TempDir()
	blob, digest := blobOf(t, pieceSize)
	s := open(t, dir, 0, nil)
	p, _ := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	p.Release()
	_, gone := blobOf(t, 10)
	goneP, _ := s.OpenPartial(gone, 10, pieceSize)
	goneP.Release()
	s.Close()

	hexGone, _ := hexOf(gone)
	os.Remove(filepath.Join(dir, "partial", "sha256", hexGone))
	stray := filepath.Join(dir, "partial", "sha256", "ff"+hexGone[2:])
	os.WriteFile(stray, []byte("junk"), 0o644)

	s = open(t, dir, 0, nil)
	defer s.Close()
	if !bytes.Equal(readAll(t, s, digest), blob) {
		t.Fatal("complete blob lost in recovery")
	}
	if _, _, ok := s.Pending(gone); ok {
		t.Fatal("record of a vanished partial survived recovery")
	}
	if _, err := os.Stat(stray); !os.IsNotExist(err) {
		t.Fatal("stray partial file survived recovery")
	}
}

func TestEvictsLeastRecentlyUsed(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { return now }
	s := open(t, t.TempDir(), 2*pieceSize, clock)
	defer s.Close()
	var digests []string
	for i := range 3 {
		blob, digest := blobOf(t, pieceSize)
		p, _ := s.OpenPartial(digest, pieceSize, pieceSize)
		if err := p.Append(bytes.NewReader(blob), nil); err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			// Touch the first blob so that the second is the oldest.
			now = now.Add(time.Hour)
			f, _, err := s.Open(digests[0])
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
		if err := p.Commit(); err != nil {
			t.Fatal(err)
		}
		p.Release()
		digests = append(digests, digest)
		now = now.Add(time.Minute)
	}
	if s.Has(digests[1]) || !s.Has(digests[0]) || !s.Has(digests[2]) {
		t.Fatalf("after eviction: has = %v %v %v, want true false true", s.Has(digests[0]), s.Has(digests[1]), s.Has(digests[2]))
	}
	if s.Used() > 2*pieceSize {
		t.Fatalf("used %d over quota", s.Used())
	}
}

// BenchmarkWritePiece writes verified 4 MiB pieces (write, fsync, record).
func BenchmarkWritePiece(b *testing.B) {
	const ps = 4 << 20
	s, err := Open(Options{Dir: b.TempDir()}, zaptest.NewLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	data := make([]byte, ps)
	rand.Read(data)
	const pieces = 16
	p, err := s.OpenPartial("sha256:"+hex.EncodeToString(make([]byte, 32)), pieces*ps, ps)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Release()
	b.SetBytes(ps)
	for i := 0; b.Loop(); i++ {
		if err := p.WritePiece(i%pieces, data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReadPiece reads 4 MiB pieces of a complete blob as the piece
// server does.
func BenchmarkReadPiece(b *testing.B) {
	const ps = 4 << 20
	s, err := Open(Options{Dir: b.TempDir()}, zaptest.NewLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	blob := make([]byte, 16*ps)
	rand.Read(blob)
	sum := sha256.Sum256(blob)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	p, _ := s.OpenPartial(digest, int64(len(blob)), ps)
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		b.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		b.Fatal(err)
	}
	p.Release()
	buf := make([]byte, ps)
	b.SetBytes(ps)
	for i := 0; b.Loop(); i++ {
		r, _, err := s.PieceReader(digest, i%16, ps)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(r, buf); err != nil {
			b.Fatal(err)
		}
		r.Close()
	}
}

// After a digest mismatch the bad bytes leave no record behind, even when
// the filler releases the partial afterwards with unsynced pieces.
func TestMismatchLeavesNoRecordAfterRelease(t *testing.T) {
	s := open(t, t.TempDir(), 0, nil)
	defer s.Close()
	blob, digest := blobOf(t, 8*pieceSize)
	bad := append([]byte(nil), blob...)
	bad[0] ^= 1
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Append(bytes.NewReader(bad), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("commit: %v", err)
	}
	p.Release()
	if _, _, ok := s.Pending(digest); ok {
		t.Fatal("a record of the discarded partial was written back")
	}
	p, err = s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	if have := p.Have(); have.Count() != 0 || p.Offset() != 0 {
		t.Fatalf("reopened with %d pieces at offset %d, want a fresh start", have.Count(), p.Offset())
	}
}

// A failed fill that a reader still holds is not handed to the next fill.
func TestFailedPartialIsNotReused(t *testing.T) {
	s := open(t, t.TempDir(), 0, nil)
	defer s.Close()
	blob, digest := blobOf(t, 2*pieceSize)
	p1, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	p1.Retain() // a slow reader
	p1.Fail(io.ErrUnexpectedEOF)
	p1.Release() // the failed filler
	p2, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	if p2 == p1 || p2.Err() != nil {
		t.Fatalf("the next fill got the failed partial (same=%v, err=%v)", p2 == p1, p2.Err())
	}
	if err := p2.Append(bytes.NewReader(blob), nil); err != nil {
		t.Fatal(err)
	}
	if err := p2.Commit(); err != nil {
		t.Fatalf("retry commit: %v", err)
	}
	p2.Release()
	p1.Release()
	if !bytes.Equal(readAll(t, s, digest), blob) {
		t.Fatal("retried blob differs")
	}
}
