package swarm

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// Conformance tests: each seam's real implementation and its in-memory
// twin pass the same suite.

func testClock(t *testing.T, c Clock, advance func(time.Duration)) {
	t0 := c.Now()
	tk := c.NewTicker(100 * time.Millisecond)
	select {
	case <-tk.C():
		t.Fatal("ticked before its interval")
	default:
	}
	advance(250 * time.Millisecond)
	if got := c.Now().Sub(t0); got < 250*time.Millisecond {
		t.Fatalf("clock moved %v, want at least 250ms", got)
	}
	select {
	case at := <-tk.C():
		if at.Before(t0.Add(100*time.Millisecond)) || at.After(c.Now()) {
			t.Fatalf("tick at %v, want between %v and %v", at, t0.Add(100*time.Millisecond), c.Now())
		}
	default:
		t.Fatal("no tick after 250ms of a 100ms ticker")
	}
	select {
	case <-tk.C():
		t.Fatal("a missed tick was kept: a ticker holds at most one")
	default:
	}
	tk.Stop()
	advance(time.Second)
	select {
	case <-tk.C():
		t.Fatal("a stopped ticker ticked")
	default:
	}
}

func TestClockConformance(t *testing.T) {
	t.Run("wall", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			testClock(t, WallClock{}, func(d time.Duration) { time.Sleep(d); synctest.Wait() })
		})
	})
	t.Run("manual", func(t *testing.T) {
		c := NewManualClock(time.Unix(1000, 0))
		testClock(t, c, c.Advance)
	})
}

const seamPieceSize = piece.MinSize

func testPieceStore(t *testing.T, open func(size, pieceSize int64) PieceStore) {
	size := int64(2*seamPieceSize + 100)
	p := open(size, seamPieceSize)
	if p.Size() != size || p.PieceSize() != seamPieceSize {
		t.Fatalf("geometry %d/%d, want %d/%d", p.Size(), p.PieceSize(), size, seamPieceSize)
	}
	if have := p.Have(); have.Len() != 3 || have.Count() != 0 {
		t.Fatalf("new store has %d of %d pieces, want 0 of 3", have.Count(), have.Len())
	}
	if w := p.Waiting(); w != -1 {
		t.Fatalf("Waiting with no reader = %d, want -1", w)
	}
	if err := p.WritePiece(1, make([]byte, 10)); err == nil {
		t.Fatal("a piece of the wrong length was accepted")
	}
	changed := p.Changed()
	if err := p.WritePiece(2, bytes.Repeat([]byte{2}, 100)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("Changed was not closed by a write")
	}
	have := p.Have()
	if !have.Has(2) || have.Has(0) || have.Count() != 1 {
		t.Fatalf("after writing piece 2: have %v", have.Bytes())
	}
	have.Set(0) // a copy: the store must not change
	if p.Have().Has(0) {
		t.Fatal("Have returned the store's own bitmap, not a copy")
	}
}

func TestPieceStoreConformance(t *testing.T) {
	t.Run("store.Partial", func(t *testing.T) {
		st, err := store.Open(store.Options{Dir: t.TempDir()}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		testPieceStore(t, func(size, pieceSize int64) PieceStore {
			p, err := st.OpenPartial("sha256:"+hex.EncodeToString(make([]byte, 32)), size, pieceSize)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Release)
			return p
		})
	})
	for _, keep := range []bool{true, false} {
		t.Run("MemPartial", func(t *testing.T) {
			testPieceStore(t, func(size, pieceSize int64) PieceStore { return NewMemPartial(size, pieceSize, keep, false) })
		})
	}
}

// fetcherCase is a fetcher and a peer that serves pieces 0 and 2 of blob
// (piece 1 is missing until fill writes it).
type fetcherCase struct {
	f       PieceFetcher
	server  peer.ID
	unknown peer.ID
	digest  string
	blob    []byte
	fill    func()
}

func testBlob(t *testing.T) ([]byte, string) {
	blob := make([]byte, 2*seamPieceSize+100)
	_, _ = crand.Read(blob)
	sum := sha256.Sum256(blob)
	return blob, "sha256:" + hex.EncodeToString(sum[:])
}

func testPieceFetcher(t *testing.T, c fetcherCase) {
	ctx := context.Background()
	size := int64(len(c.blob))
	req := func(i int) swarmproto.PieceRequest {
		return swarmproto.PieceRequest{Digest: c.digest, PieceSize: seamPieceSize, Index: i}
	}
	cidOf := func(i int) (int64, []byte) {
		off, length := piece.Bounds(i, size, seamPieceSize)
		return length, c.blob[off : off+length]
	}
	buf := make([]byte, seamPieceSize)
	for _, i := range []int{0, 2} {
		length, want := cidOf(i)
		seen := 0
		data, have, err := c.f.Fetch(ctx, c.server, req(i), length, piece.CID(want), buf, func(n int) { seen += n })
		if err != nil {
			t.Fatalf("piece %d: %v", i, err)
		}
		checkHave(t, have)
		if !bytes.Equal(data, want) || seen != int(length) {
			t.Fatalf("piece %d: %d bytes (onData saw %d), want %d matching", i, len(data), seen, length)
		}
	}
	length, want := cidOf(1)
	_, have, err := c.f.Fetch(ctx, c.server, req(1), length, piece.CID(want), buf, nil)
	if !errors.Is(err, pieceserver.ErrUnavailable) {
		t.Fatalf("missing piece: %v, want ErrUnavailable", err)
	}
	checkHave(t, have)
	length, _ = cidOf(0)
	if _, _, err := c.f.Fetch(ctx, c.server, req(0), length, piece.CID([]byte("other")), buf, nil); !errors.Is(err, pieceserver.ErrCorrupt) {
		t.Fatalf("piece against the wrong CID: %v, want ErrCorrupt", err)
	}
	_, _, err = c.f.Fetch(ctx, c.unknown, req(0), length, piece.CID(want), buf, nil)
	if err == nil || errors.Is(err, pieceserver.ErrUnavailable) || errors.Is(err, pieceserver.ErrBusy) || errors.Is(err, pieceserver.ErrCorrupt) {
		t.Fatalf("unknown peer: %v, want a plain failure", err)
	}
	testWatch(t, c)
}

// testWatch watches the server's bitmap: pieces 0 and 2 at once, then the
// whole blob once fill writes piece 1, and the watch ends by itself.
func testWatch(t *testing.T, c fetcherCase) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wreq := swarmproto.WatchRequest{Digest: c.digest, PieceSize: seamPieceSize}
	seen := make(chan []byte, 8)
	ended := make(chan error, 1)
	go func() { ended <- c.f.Watch(ctx, c.server, wreq, 3, func(have []byte) { seen <- have }) }()
	checkHave(t, <-seen)
	c.fill()
	for {
		select {
		case have := <-seen:
			b, err := piece.BitmapFromBytes(3, have)
			if err != nil {
				t.Fatal(err)
			}
			if !b.Has(0) || !b.Has(2) {
				t.Fatalf("watched bitmap %08b lost a piece", have)
			}
			continue
		case err := <-ended:
			if err != nil {
				t.Fatalf("watch of a blob that completed: %v, want nil", err)
			}
		}
		break
	}
	if len(seen) > 0 {
		b, _ := piece.BitmapFromBytes(3, <-seen)
		if !b.Complete() {
			t.Fatalf("last watched bitmap %v, want complete", b)
		}
	}
	other := swarmproto.WatchRequest{Digest: "sha256:" + hex.EncodeToString(make([]byte, 32)), PieceSize: seamPieceSize}
	if err := c.f.Watch(ctx, c.server, other, 3, func([]byte) { t.Error("news of a blob the peer lacks") }); !errors.Is(err, pieceserver.ErrUnavailable) {
		t.Fatalf("watch of an unknown blob: %v, want ErrUnavailable", err)
	}
	if err := c.f.Watch(ctx, c.unknown, wreq, 3, func([]byte) { t.Error("news from an unknown peer") }); err == nil || errors.Is(err, pieceserver.ErrUnavailable) {
		t.Fatalf("watch of an unknown peer: %v, want a plain failure", err)
	}
}

// checkHave checks the server's bitmap an answer carried: pieces 0 and 2.
func checkHave(t *testing.T, have []byte) {
	t.Helper()
	b, err := piece.BitmapFromBytes(3, have)
	if err != nil {
		t.Fatalf("answer's bitmap: %v", err)
	}
	if !b.Has(0) || b.Has(1) || !b.Has(2) {
		t.Fatalf("answer's bitmap %08b, want pieces 0 and 2", have)
	}
}

func TestPieceFetcherConformance(t *testing.T) {
	t.Run("HostFetcher", func(t *testing.T) {
		dir := t.TempDir()
		keyPath := filepath.Join(dir, "swarm.key")
		f, err := os.Create(keyPath)
		if err != nil {
			t.Fatal(err)
		}
		if err := p2p.GenerateSwarmKey(f); err != nil {
			t.Fatal(err)
		}
		f.Close()
		st, err := store.Open(store.Options{Dir: filepath.Join(dir, "store")}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		blob, digest := testBlob(t)
		p, err := st.OpenPartial(digest, int64(len(blob)), seamPieceSize)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Release)
		for _, i := range []int{0, 2} {
			off, length := piece.Bounds(i, int64(len(blob)), seamPieceSize)
			if err := p.WritePiece(i, blob[off:off+length]); err != nil {
				t.Fatal(err)
			}
		}
		srv, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
		ps := pieceserver.NewServer(st, nil, 4, zaptest.NewLogger(t))
		ps.Register(srv)
		ps.RegisterWatch(srv)
		client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { client.Close() })
		client.Peerstore().AddAddrs(srv.ID(), srv.Addrs(), time.Hour)
		testPieceFetcher(t, fetcherCase{f: HostFetcher{Host: client}, server: srv.ID(), unknown: testPeer(t, 99), digest: digest, blob: blob,
			fill: func() { writePiece(t, p, blob, 1) }})
	})
	t.Run("MemFetcher", func(t *testing.T) {
		blob, digest := testBlob(t)
		p := NewMemPartial(int64(len(blob)), seamPieceSize, true, false)
		for _, i := range []int{0, 2} {
			off, length := piece.Bounds(i, int64(len(blob)), seamPieceSize)
			if err := p.WritePiece(i, blob[off:off+length]); err != nil {
				t.Fatal(err)
			}
		}
		f := NewMemFetcher()
		f.Serve(testPeer(t, 1), digest, p)
		testPieceFetcher(t, fetcherCase{f: f, server: testPeer(t, 1), unknown: testPeer(t, 99), digest: digest, blob: blob,
			fill: func() { writePiece(t, p, blob, 1) }})
	})
}

// writePiece writes piece i of blob into p.
func writePiece(t *testing.T, p PieceStore, blob []byte, i int) {
	t.Helper()
	off, length := piece.Bounds(i, int64(len(blob)), seamPieceSize)
	if err := p.WritePiece(i, blob[off:off+length]); err != nil {
		t.Fatal(err)
	}
}
