package store

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func commitBlob(t *testing.T, s *Store, blob []byte, digest string) {
	t.Helper()
	p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
}

func takeFresh(t *testing.T, s *Store, digest string) bool {
	t.Helper()
	f, _, err := s.Open(digest)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return s.TakeFresh(digest, f)
}

// A blob this store committed may skip one re-hash: the first open after
// the commit, of the unchanged file. Never a second one, never a file
// written since, never a blob found on disk at startup.
func TestTakeFresh(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0, nil)
	blob, digest := blobOf(t, 3*pieceSize+5)
	commitBlob(t, s, blob, digest)
	if !takeFresh(t, s, digest) {
		t.Fatal("first open after our own commit: not fresh")
	}
	if takeFresh(t, s, digest) {
		t.Fatal("second open: still fresh (the answer must be used up)")
	}

	other, otherDigest := blobOf(t, 2*pieceSize)
	commitBlob(t, s, other, otherDigest)
	f, err := os.OpenFile(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(otherDigest, "sha256:")), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("rot"), 10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if takeFresh(t, s, otherDigest) {
		t.Fatal("a file written after the commit counted as fresh")
	}

	third, thirdDigest := blobOf(t, pieceSize+1)
	commitBlob(t, s, third, thirdDigest)
	if err := s.Delete(thirdDigest); err != nil {
		t.Fatal(err)
	}
	commitBlob(t, s, third, thirdDigest)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, 0, nil)
	defer s.Close()
	if takeFresh(t, s, thirdDigest) {
		t.Fatal("a blob committed by an earlier process counted as fresh")
	}
}
