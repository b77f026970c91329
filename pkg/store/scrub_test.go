package store_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/starling-oci/starling/pkg/store"
)

func corrupt(t *testing.T, dir, digest string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(digest, "sha256:")), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{0xFF, 0x00, 0xFF}, 100); err != nil {
		t.Fatal(err)
	}
}

// Verify finds a blob corrupted after its commit, quarantines it and
// tells OnRemove (which withdraws it from the swarm).
func TestVerifyQuarantinesCorruptBlob(t *testing.T) {
	dir := t.TempDir()
	removed := make(chan string, 4)
	st, err := store.Open(store.Options{Dir: dir, OnRemove: func(d string) { removed <- d }}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	good, dg := randomBlob(t, 300_000)
	bad, db := randomBlob(t, 300_000)
	for d, b := range map[string][]byte{dg: good, db: bad} {
		if err := putBlob(st, d, b); err != nil {
			t.Fatal(err)
		}
	}
	corrupt(t, dir, db)
	if err := st.Verify(context.Background(), dg, 0); err != nil {
		t.Fatalf("verify intact blob: %v", err)
	}
	if err := st.Verify(context.Background(), db, 0); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("verify corrupt blob: %v, want ErrCorrupt", err)
	}
	if st.Has(db) || !st.Has(dg) {
		t.Fatalf("after verify: has corrupt %v (want false), has intact %v (want true)", st.Has(db), st.Has(dg))
	}
	if got := <-removed; got != db {
		t.Fatalf("OnRemove got %s, want %s", got, db)
	}
	// It can be fetched again.
	if err := putBlob(st, db, bad); err != nil {
		t.Fatalf("fetch again after quarantine: %v", err)
	}
}

// The background scrub finds it on its own, at the rate it is given.
func TestScrubFindsCorruptBlob(t *testing.T) {
	dir := t.TempDir()
	removed := make(chan string, 4)
	st, err := store.Open(store.Options{Dir: dir, OnRemove: func(d string) { removed <- d }}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var digests []string
	for range 3 {
		b, d := randomBlob(t, 1<<20)
		if err := putBlob(st, d, b); err != nil {
			t.Fatal(err)
		}
		digests = append(digests, d)
	}
	corrupt(t, dir, digests[2])
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	start := time.Now()
	go func() { st.Scrub(ctx, 8<<20); close(done) }()
	defer func() { cancel(); <-done }()
	select {
	case got := <-removed:
		if got != digests[2] {
			t.Fatalf("scrub quarantined %s, want %s", got, digests[2])
		}
	case <-time.After(20 * time.Second):
		t.Fatal("scrub did not find the corrupt blob in 20 s")
	}
	if !st.Has(digests[0]) || !st.Has(digests[1]) || st.Has(digests[2]) {
		t.Fatal("scrub removed the wrong blobs")
	}
	t.Logf("found after %v", time.Since(start))
}

// A pass starts at most once per ScrubEvery: a small cache is not re-read
// over and over. Fails before (a 1 MiB store at 64 MiB/s was re-hashed
// some 60 times a second; in the 100-agent pull storm every agent
// re-hashed its fresh blobs at 8 MiB/s until the storm ended).
func TestScrubPassesAreSpaced(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	st, err := store.Open(store.Options{Dir: t.TempDir()}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b, d := randomBlob(t, 1<<20)
	if err := putBlob(st, d, b); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { st.Scrub(ctx, 64<<20); close(done) }()
	passes := func() int { return logs.FilterMessage("scrub pass done").Len() }
	for deadline := time.Now().Add(20 * time.Second); passes() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no scrub pass in 20 s")
		}
	}
	time.Sleep(time.Second) // about 60 more passes at the old pace
	cancel()
	<-done
	if n := passes(); n != 1 {
		t.Fatalf("%d scrub passes over a 1 MiB store within a second, want 1 per %v", n, store.ScrubEvery)
	}
}
