package piece

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/starling-oci/starling/internal/cputime"
)

func TestCountBoundsIndex(t *testing.T) {
	t.Parallel()
	const ps = 100
	tests := []struct {
		name     string
		size     int64
		count    int
		lastOff  int64
		lastSize int64
	}{
		{name: "empty", size: 0, count: 0},
		{name: "one byte", size: 1, count: 1, lastOff: 0, lastSize: 1},
		{name: "short single piece", size: 99, count: 1, lastOff: 0, lastSize: 99},
		{name: "exact single piece", size: 100, count: 1, lastOff: 0, lastSize: 100},
		{name: "one byte over", size: 101, count: 2, lastOff: 100, lastSize: 1},
		{name: "exact multiple", size: 300, count: 3, lastOff: 200, lastSize: 100},
		{name: "short last piece", size: 250, count: 3, lastOff: 200, lastSize: 50},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := Count(tt.size, ps); got != tt.count {
				t.Fatalf("Count(%d, %d) = %d, want %d", tt.size, ps, got, tt.count)
			}
			var total int64
			for i := range tt.count {
				off, n := Bounds(i, tt.size, ps)
				if off != total {
					t.Errorf("Bounds(%d): off %d, want %d", i, off, total)
				}
				if n <= 0 || n > ps {
					t.Errorf("Bounds(%d): length %d out of (0, %d]", i, n, ps)
				}
				if got := Index(off, ps); got != i {
					t.Errorf("Index(%d) = %d, want %d", off, got, i)
				}
				if got := Index(off+n-1, ps); got != i {
					t.Errorf("Index(%d) = %d, want %d", off+n-1, got, i)
				}
				total += n
			}
			if total != tt.size {
				t.Errorf("pieces cover %d bytes, want %d", total, tt.size)
			}
			if tt.count > 0 {
				off, n := Bounds(tt.count-1, tt.size, ps)
				if off != tt.lastOff || n != tt.lastSize {
					t.Errorf("last piece = (%d, %d), want (%d, %d)", off, n, tt.lastOff, tt.lastSize)
				}
			}
			for _, i := range []int{-1, tt.count} {
				if off, n := Bounds(i, tt.size, ps); off != 0 || n != 0 {
					t.Errorf("Bounds(%d) out of range = (%d, %d), want (0, 0)", i, off, n)
				}
			}
		})
	}
}

func TestCountInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct{ size, ps int64 }{{-1, 10}, {10, 0}, {10, -5}}
	for _, tt := range tests {
		if got := Count(tt.size, tt.ps); got != 0 {
			t.Errorf("Count(%d, %d) = %d, want 0", tt.size, tt.ps, got)
		}
	}
	if got := Index(-1, 10); got != -1 {
		t.Errorf("Index(-1, 10) = %d, want -1", got)
	}
	if got := Index(5, 0); got != -1 {
		t.Errorf("Index(5, 0) = %d, want -1", got)
	}
}

func TestCIDKnownAnswer(t *testing.T) {
	t.Parallel()
	for _, data := range [][]byte{nil, []byte("hello starling"), bytes.Repeat([]byte{0xab}, 1<<16)} {
		sum := sha256.Sum256(data)
		want := append([]byte{0x01, 0x55, 0x12, 0x20}, sum[:]...)
		c := CID(data)
		if got := c.Bytes(); !bytes.Equal(got, want) {
			t.Fatalf("CID(%d bytes) = %x, want %x", len(data), got, want)
		}
		if err := Verify(c, data); err != nil {
			t.Fatalf("Verify own CID: %v", err)
		}
	}
	// Pin the textual form too: it is what metainfo JSON carries.
	const empty = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
	if got := CID(nil).String(); got != empty {
		t.Errorf("CID(empty) = %s, want %s", got, empty)
	}
}

func TestVerify(t *testing.T) {
	t.Parallel()
	data := []byte("piece bytes")
	sum := sha256.Sum256(data)
	mh, err := multihash.Encode(sum[:], multihash.SHA2_256)
	if err != nil {
		t.Fatal(err)
	}
	blake, err := multihash.Sum(data, multihash.BLAKE3, 32)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cid     cid.Cid
		data    []byte
		wantErr error
	}{
		{name: "match", cid: CID(data), data: data},
		{name: "flipped byte", cid: CID(data), data: []byte("piece bytez"), wantErr: ErrMismatch},
		{name: "truncated", cid: CID(data), data: data[:5], wantErr: ErrMismatch},
		{name: "undefined cid", cid: cid.Undef, data: data, wantErr: ErrUnsupportedCID},
		{name: "cidv0", cid: cid.NewCidV0(mh), data: data, wantErr: ErrUnsupportedCID},
		{name: "dag-pb codec", cid: cid.NewCidV1(cid.DagProtobuf, mh), data: data, wantErr: ErrUnsupportedCID},
		{name: "blake3", cid: cid.NewCidV1(cid.Raw, blake), data: data, wantErr: ErrUnsupportedCID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := Verify(tt.cid, tt.data)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Verify error = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestHasher(t *testing.T) {
	t.Parallel()
	const ps = 1000
	tests := []struct {
		name  string
		size  int64
		chunk []int // write sizes, cycled
	}{
		{name: "empty", size: 0, chunk: []int{7}},
		{name: "short single piece", size: 999, chunk: []int{1}},
		{name: "exact multiple, aligned writes", size: 3 * ps, chunk: []int{ps}},
		{name: "short last piece, odd chunks", size: 3*ps + 17, chunk: []int{1, 7, 333, 1500, 2}},
		{name: "one big write", size: 5*ps + 1, chunk: []int{5*ps + 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			blob := make([]byte, tt.size)
			var seed [32]byte
			seed[0] = byte(tt.size)
			_, _ = rand.NewChaCha8(seed).Read(blob)

			var got []cid.Cid
			var h *Hasher
			h = NewHasher(tt.size, ps, func(i int, c cid.Cid) {
				if i != len(got) {
					t.Errorf("OnPiece index %d, want %d", i, len(got))
				}
				// The callback must fire as soon as the piece is complete.
				if n := len(h.Pieces()); n != i+1 {
					t.Errorf("OnPiece(%d) with %d pieces recorded", i, n)
				}
				got = append(got, c)
			})
			if tt.size > 0 && h.Digest() != "" {
				t.Fatal("Digest before any write is not empty")
			}
			rest := blob
			for k := 0; len(rest) > 0; k++ {
				n := min(tt.chunk[k%len(tt.chunk)], len(rest))
				if w, err := h.Write(rest[:n]); err != nil || w != n {
					t.Fatalf("Write(%d) = %d, %v", n, w, err)
				}
				rest = rest[n:]
			}

			var want []cid.Cid
			for i := range Count(tt.size, ps) {
				off, n := Bounds(i, tt.size, ps)
				want = append(want, CID(blob[off:off+n]))
			}
			if !equalCIDs(got, want) || !equalCIDs(h.Pieces(), want) {
				t.Fatalf("pieces = %v (callback) / %v, want %v", got, h.Pieces(), want)
			}
			sum := sha256.Sum256(blob)
			if d := h.Digest(); d != "sha256:"+hex.EncodeToString(sum[:]) {
				t.Errorf("Digest = %s, want sha256:%x", d, sum)
			}
			if _, err := h.Write([]byte{0}); err == nil {
				t.Error("Write past size succeeded")
			}
		})
	}
}

func TestHasherErrors(t *testing.T) {
	t.Parallel()
	h := NewHasher(10, 4, nil)
	if _, err := h.Write(make([]byte, 6)); err != nil {
		t.Fatal(err)
	}
	// An overlong write is rejected whole and leaves the state alone.
	if n, err := h.Write(make([]byte, 5)); err == nil || n != 0 {
		t.Fatalf("overlong Write = %d, %v; want 0, error", n, err)
	}
	if _, err := h.Write(make([]byte, 4)); err != nil {
		t.Fatalf("Write of the remaining bytes: %v", err)
	}
	if len(h.Pieces()) != 3 || h.Digest() == "" {
		t.Fatalf("after full write: %d pieces, digest %q", len(h.Pieces()), h.Digest())
	}

	for _, h := range []*Hasher{NewHasher(-1, 4, nil), NewHasher(10, 0, nil)} {
		if _, err := h.Write([]byte{1}); err == nil {
			t.Error("Write on invalid hasher succeeded")
		}
		if h.Digest() != "" {
			t.Error("Digest on invalid hasher is not empty")
		}
	}
}

func TestBitmap(t *testing.T) {
	t.Parallel()
	tests := []struct {
		n   int
		set []int
	}{
		{n: 0},
		{n: 1, set: []int{0}},
		{n: 8, set: []int{0, 7}},
		{n: 9, set: []int{8}},
		{n: 13, set: []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}},
		{n: 100, set: []int{3, 3, 50, 99, -1, 100}}, // duplicates and out of range
	}
	for _, tt := range tests {
		b := NewBitmap(tt.n)
		want := map[int]bool{}
		for _, i := range tt.set {
			b.Set(i)
			if i >= 0 && i < tt.n {
				want[i] = true
			}
		}
		if b.Len() != tt.n || b.Count() != len(want) || b.Complete() != (len(want) == tt.n) {
			t.Errorf("n=%d: Len %d Count %d Complete %v, want %d %d %v",
				tt.n, b.Len(), b.Count(), b.Complete(), tt.n, len(want), len(want) == tt.n)
		}
		raw := b.Bytes()
		if len(raw) != (tt.n+7)/8 {
			t.Errorf("n=%d: %d bytes", tt.n, len(raw))
		}
		back, err := BitmapFromBytes(tt.n, raw)
		if err != nil {
			t.Fatalf("n=%d: round trip: %v", tt.n, err)
		}
		for i := -1; i <= tt.n; i++ {
			if b.Has(i) != want[i] || back.Has(i) != want[i] {
				t.Errorf("n=%d: Has(%d) = %v / %v after round trip, want %v", tt.n, i, b.Has(i), back.Has(i), want[i])
			}
		}
		if back.Count() != b.Count() {
			t.Errorf("n=%d: Count after round trip %d, want %d", tt.n, back.Count(), b.Count())
		}
	}

	// Bytes and BitmapFromBytes copy, so callers cannot alias internal state.
	b := NewBitmap(8)
	b.Bytes()[0] = 0xff
	if b.Count() != 0 || b.Has(0) {
		t.Error("Bytes aliases the bitmap")
	}
	// Bit 0 is the most significant bit of byte 0.
	b.Set(0)
	if got := b.Bytes(); got[0] != 0x80 {
		t.Errorf("bit 0 encodes as %#x, want 0x80", got[0])
	}
}

func TestBitmapFromBytesInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		n    int
		b    []byte
	}{
		{name: "negative length", n: -1, b: nil},
		{name: "too short", n: 9, b: []byte{0}},
		{name: "too long", n: 8, b: []byte{0, 0}},
		{name: "bit past end", n: 9, b: []byte{0, 0x40}},
		{name: "bytes for zero", n: 0, b: []byte{0}},
	}
	for _, tt := range tests {
		if _, err := BitmapFromBytes(tt.n, tt.b); err == nil {
			t.Errorf("%s: BitmapFromBytes(%d, %x) succeeded", tt.name, tt.n, tt.b)
		}
	}
}

func equalCIDs(a, b []cid.Cid) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equals(b[i]) {
			return false
		}
	}
	return true
}

func BenchmarkCID(b *testing.B) {
	data := make([]byte, DefaultSize)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		CID(data)
	}
}

// BenchmarkVerify checks a 4 MiB piece against its CID, as every piece
// received from a peer is; MB/cpu-s is the rate of one core.
func BenchmarkVerify(b *testing.B) {
	data := make([]byte, DefaultSize)
	c := CID(data)
	b.SetBytes(int64(len(data)))
	cpu := cputime.Start()
	for b.Loop() {
		if err := Verify(c, data); err != nil {
			b.Fatal(err)
		}
	}
	cpu.Report(b, int64(b.N)*int64(len(data)))
}

func BenchmarkHasher(b *testing.B) {
	const size = 64 << 20
	chunk := make([]byte, 32<<10) // typical network read size
	b.SetBytes(size)
	for b.Loop() {
		h := NewHasher(size, DefaultSize, nil)
		for off := int64(0); off < size; off += int64(len(chunk)) {
			if _, err := h.Write(chunk); err != nil {
				b.Fatal(err)
			}
		}
		if h.Digest() == "" {
			b.Fatal("no digest")
		}
	}
}

func TestBitmapClearAndClone(t *testing.T) {
	b := NewBitmap(10)
	b.Set(3)
	b.Set(9)
	c := b.Clone()
	c.Clear(3)
	c.Clear(4)  // absent: no change
	c.Clear(42) // out of range: ignored
	if !b.Has(3) || b.Count() != 2 {
		t.Fatalf("Clear on a clone changed the original: %v", b.Bytes())
	}
	if c.Has(3) || !c.Has(9) || c.Count() != 1 {
		t.Fatalf("after Clear(3): has 3 %v, has 9 %v, count %d", c.Has(3), c.Has(9), c.Count())
	}
}
