package store

import (
	"bytes"
	"errors"
	"testing"
)

// TestDigestWithoutRereading: pieces written by the swarm are hashed for
// the blob digest as they are written. In order, Commit reads nothing back;
// a piece that arrives ahead of the hash is read back once, nothing else;
// after a restart (bytes the process never saw) the file is read; and a
// wrong byte is still caught.
func TestDigestWithoutRereading(t *testing.T) {
	const n = 5
	for _, tt := range []struct {
		name       string
		order      []int
		wantReread int64
	}{
		{name: "in order", order: []int{0, 1, 2, 3, 4}, wantReread: 0},
		{name: "reversed", order: []int{4, 3, 2, 1, 0}, wantReread: 3*pieceSize + 7},
		{name: "one ahead", order: []int{1, 0, 2, 4, 3}, wantReread: pieceSize + 7},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t, t.TempDir(), 0, nil)
			defer s.Close()
			blob, digest := blobOf(t, (n-1)*pieceSize+7)
			p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Release()
			for _, i := range tt.order {
				end := min((i+1)*pieceSize, len(blob))
				if err := p.WritePiece(i, blob[i*pieceSize:end]); err != nil {
					t.Fatal(err)
				}
			}
			if err := p.Commit(); err != nil {
				t.Fatal(err)
			}
			if got := p.Reread(); got != tt.wantReread {
				t.Errorf("read back %d bytes for the digest, want %d", got, tt.wantReread)
			}
			if !bytes.Equal(readAll(t, s, digest), blob) {
				t.Fatal("committed blob differs")
			}
		})
	}

	t.Run("wrong byte", func(t *testing.T) {
		s := open(t, t.TempDir(), 0, nil)
		defer s.Close()
		blob, digest := blobOf(t, 2*pieceSize)
		p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Release()
		bad := bytes.Clone(blob[pieceSize:])
		bad[10] ^= 1
		if err := p.WritePiece(0, blob[:pieceSize]); err != nil {
			t.Fatal(err)
		}
		if err := p.WritePiece(1, bad); err != nil {
			t.Fatal(err)
		}
		if err := p.Commit(); !errors.Is(err, ErrDigestMismatch) {
			t.Fatalf("commit: %v, want digest mismatch", err)
		}
		if _, _, err := s.Open(digest); !errors.Is(err, ErrNotFound) {
			t.Fatalf("open after mismatch: %v", err)
		}
	})

	t.Run("after restart", func(t *testing.T) {
		dir := t.TempDir()
		s := open(t, dir, 0, nil)
		blob, digest := blobOf(t, 3*pieceSize)
		p, err := s.OpenPartial(digest, int64(len(blob)), pieceSize)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.WritePiece(0, blob[:pieceSize]); err != nil {
			t.Fatal(err)
		}
		p.Release()
		s.Close()
		s = open(t, dir, 0, nil)
		defer s.Close()
		if p, err = s.OpenPartial(digest, int64(len(blob)), pieceSize); err != nil {
			t.Fatal(err)
		}
		defer p.Release()
		for i := 1; i < 3; i++ {
			if err := p.WritePiece(i, blob[i*pieceSize:(i+1)*pieceSize]); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Commit(); err != nil {
			t.Fatal(err)
		}
		if got := p.Reread(); got != int64(len(blob)) {
			t.Errorf("read back %d bytes after a restart, want the whole blob (%d)", got, len(blob))
		}
	})
}
