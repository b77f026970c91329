package store_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/internal/testdisk"
	"github.com/starling-oci/starling/pkg/store"
)

// fillDisk writes a ballast file until the filesystem is full (leaving
// leave bytes free) and returns its path.
func fillDisk(t *testing.T, dir string, leave int64) string {
	t.Helper()
	path := filepath.Join(dir, "ballast")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	want := int64(st.Bavail)*int64(st.Bsize) - leave
	chunk := make([]byte, 1<<20)
	for want > 0 {
		n := min(want, int64(len(chunk)))
		w, err := f.Write(chunk[:n])
		want -= int64(w)
		if err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			t.Fatal(err)
		}
	}
	return path
}

func randomBlob(t *testing.T, size int) ([]byte, string) {
	t.Helper()
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return b, "sha256:" + hex.EncodeToString(sum[:])
}

func putBlob(st *store.Store, digest string, b []byte) error {
	p, err := st.OpenPartial(digest, int64(len(b)), 1<<20)
	if err != nil {
		return err
	}
	defer p.Release()
	if err := p.Append(bytes.NewReader(b), nil); err != nil {
		p.Fail(err)
		return err
	}
	return p.Commit()
}

func readBlob(t *testing.T, st *store.Store, digest string) {
	t.Helper()
	f, _, err := st.Open(digest)
	if err != nil {
		t.Fatalf("open %s: %v", digest, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		t.Fatalf("blob %s reads as %s", digest, got)
	}
}

// Invariant 7: a full data disk is an error, never a crash. Before the
// fix, badger's memory-mapped write-ahead log took a SIGBUS here (a
// metadata write on a full tmpfs) and the whole process died.
func TestFullDiskIsAnErrorNotACrash(t *testing.T) {
	dir := testdisk.Tmpfs(t, 160<<20)
	st, err := store.Open(store.Options{Dir: dir}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a, da := randomBlob(t, 8<<20)
	if err := putBlob(st, da, a); err != nil {
		t.Fatal(err)
	}
	ballast := fillDisk(t, dir, 0)

	// A fill fails at once with a clear error, and leaves no partial.
	b, db := randomBlob(t, 8<<20)
	if err := putBlob(st, db, b); !errors.Is(err, store.ErrDiskFull) {
		t.Fatalf("fill on a full disk: %v, want ErrDiskFull", err)
	}
	// Metadata writes fail as errors (or succeed within the reserve).
	body := bytes.Repeat([]byte("m"), 8<<10)
	for i := range 2000 {
		sum := sha256.Sum256([]byte{byte(i), byte(i >> 8)})
		if err := st.PutManifest("sha256:"+hex.EncodeToString(sum[:]), store.Manifest{Body: body}); err != nil && !errors.Is(err, store.ErrDiskFull) {
			t.Fatalf("manifest write %d on a full disk: %v, want nil or ErrDiskFull", i, err)
		}
	}
	// What is here is still served.
	readBlob(t, st, da)

	// Space returns: fills and metadata writes work again, without a restart.
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	if err := putBlob(st, db, b); err != nil {
		t.Fatalf("fill after space returned: %v", err)
	}
	readBlob(t, st, db)
	if err := st.PutManifest(da, store.Manifest{Body: body}); err != nil {
		t.Fatalf("manifest write after space returned: %v", err)
	}
}

// When the disk is too full for a blob, least recently used complete
// blobs are evicted to make room before the fill fails; when evicting all
// of them would not make room, nothing is evicted.
func TestFullDiskEvictsBeforeFailing(t *testing.T) {
	dir := testdisk.Tmpfs(t, 160<<20)
	now := time.Unix(1_000_000, 0)
	st, err := store.Open(store.Options{Dir: dir, Now: func() time.Time { return now }}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a, da := randomBlob(t, 8<<20)
	if err := putBlob(st, da, a); err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Hour)
	b, db := randomBlob(t, 8<<20)
	if err := putBlob(st, db, b); err != nil {
		t.Fatal(err)
	}

	// Too big even with everything evicted: refused, nothing evicted.
	ballast := fillDisk(t, dir, store.DefaultReserve+4<<20)
	c, dc := randomBlob(t, 32<<20)
	if err := putBlob(st, dc, c); !errors.Is(err, store.ErrDiskFull) {
		t.Fatalf("fill larger than the evictable blobs: %v, want ErrDiskFull", err)
	}
	if !st.Has(da) || !st.Has(db) {
		t.Fatal("a hopeless fill evicted blobs")
	}
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}

	// Room for the new blob once the least recently used one is gone.
	ballast = fillDisk(t, dir, store.DefaultReserve+4<<20)
	defer os.Remove(ballast)
	now = now.Add(time.Hour)
	d, dd := randomBlob(t, 8<<20)
	if err := putBlob(st, dd, d); err != nil {
		t.Fatalf("fill that eviction makes room for: %v", err)
	}
	if st.Has(da) || !st.Has(db) || st.Evictions() != 1 {
		t.Fatalf("after the fill: has A %v (want false, least recently used), has B %v (want true), %d evictions (want 1)",
			st.Has(da), st.Has(db), st.Evictions())
	}
	readBlob(t, st, dd)
}
