package piece

import (
	"fmt"
	"math/bits"
)

// Bitmap is a fixed-length set of piece indexes. Bit i lives in byte i/8,
// most significant bit first (the BitTorrent layout), so Bytes can be stored
// or sent as is. The zero value is an empty bitmap of length 0.
type Bitmap struct {
	n     int
	count int // set bits, kept so Count and Complete are O(1)
	bits  []byte
}

// NewBitmap returns an empty bitmap for n pieces. A negative n is treated
// as 0.
func NewBitmap(n int) Bitmap {
	n = max(n, 0)
	return Bitmap{n: n, bits: make([]byte, byteLen(n))}
}

// BitmapFromBytes decodes a bitmap of n pieces from b as produced by Bytes.
// It rejects a length that does not match n and any bit set past n, since b
// typically comes from the network or disk.
func BitmapFromBytes(n int, b []byte) (Bitmap, error) {
	if n < 0 {
		return Bitmap{}, fmt.Errorf("decode bitmap: negative length %d", n)
	}
	if len(b) != byteLen(n) {
		return Bitmap{}, fmt.Errorf("decode bitmap of %d pieces: got %d bytes, want %d", n, len(b), byteLen(n))
	}
	if rem := n % 8; rem != 0 && b[len(b)-1]&(0xff>>rem) != 0 {
		return Bitmap{}, fmt.Errorf("decode bitmap of %d pieces: bits set past the end", n)
	}
	bm := Bitmap{n: n, bits: append([]byte(nil), b...)}
	for _, x := range bm.bits {
		bm.count += bits.OnesCount8(x)
	}
	return bm, nil
}

func byteLen(n int) int { return (n + 7) / 8 }

// Set marks piece i as present. Indexes outside [0, Len) are ignored:
// callers validate indexes from the network before they get here.
func (b *Bitmap) Set(i int) {
	if i < 0 || i >= b.n {
		return
	}
	mask := byte(0x80) >> (i % 8)
	if b.bits[i/8]&mask == 0 {
		b.bits[i/8] |= mask
		b.count++
	}
}

// Has reports whether piece i is present; false for indexes out of range.
func (b Bitmap) Has(i int) bool {
	if i < 0 || i >= b.n {
		return false
	}
	return b.bits[i/8]&(byte(0x80)>>(i%8)) != 0
}

// Count returns the number of pieces present.
func (b Bitmap) Count() int { return b.count }

// Len returns the number of pieces the bitmap covers.
func (b Bitmap) Len() int { return b.n }

// Complete reports whether every piece is present (true for length 0).
func (b Bitmap) Complete() bool { return b.count == b.n }

// Bytes returns a copy of the encoded bitmap.
func (b Bitmap) Bytes() []byte { return append([]byte{}, b.bits...) }

// Clear marks piece i as absent. Indexes outside [0, Len) are ignored.
func (b *Bitmap) Clear(i int) {
	if i < 0 || i >= b.n {
		return
	}
	mask := byte(0x80) >> (i % 8)
	if b.bits[i/8]&mask != 0 {
		b.bits[i/8] &^= mask
		b.count--
	}
}

// Clone returns an independent copy of b.
func (b Bitmap) Clone() Bitmap {
	return Bitmap{n: b.n, count: b.count, bits: append([]byte(nil), b.bits...)}
}
