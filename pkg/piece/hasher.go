package piece

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"

	"github.com/ipfs/go-cid"
)

// Hasher computes piece CIDs and the blob digest while the blob streams
// through it, so the seed can publish piece i as soon as its bytes are in
// without holding a piece (let alone the blob) in memory.
//
// A Hasher is not safe for concurrent use; publish pieces from the OnPiece
// callback rather than polling Pieces from another goroutine.
type Hasher struct {
	size      int64
	pieceSize int64
	onPiece   func(i int, c cid.Cid)
	err       error // construction error, reported by every Write

	blob    hash.Hash
	piece   hash.Hash
	written int64
	pieces  []cid.Cid
	sum     []byte // scratch for piece sums
}

// NewHasher returns a Hasher for a blob of size bytes cut into pieces of
// pieceSize. onPiece, if not nil, is called synchronously from Write with
// each piece's index and CID as soon as the piece is complete, in order.
// Invalid sizes make every Write fail.
func NewHasher(size, pieceSize int64, onPiece func(i int, c cid.Cid)) *Hasher {
	h := &Hasher{
		size:      size,
		pieceSize: pieceSize,
		onPiece:   onPiece,
		blob:      sha256.New(),
		piece:     sha256.New(),
		sum:       make([]byte, 0, sha256.Size),
	}
	switch {
	case size < 0:
		h.err = fmt.Errorf("piece hasher: negative blob size %d", size)
	case pieceSize <= 0:
		h.err = fmt.Errorf("piece hasher: non-positive piece size %d", pieceSize)
	default:
		h.pieces = make([]cid.Cid, 0, Count(size, pieceSize))
	}
	return h
}

// Write hashes the next bytes of the blob. Writing past the blob size is an
// error and the offending write is rejected whole, leaving the state as it
// was before the call.
func (h *Hasher) Write(p []byte) (int, error) {
	if h.err != nil {
		return 0, h.err
	}
	if int64(len(p)) > h.size-h.written {
		return 0, fmt.Errorf("piece hasher: write of %d bytes at offset %d exceeds blob size %d", len(p), h.written, h.size)
	}
	n := len(p)
	for len(p) > 0 {
		// End of the piece being filled; the last piece may be short.
		end := min(int64(len(h.pieces)+1)*h.pieceSize, h.size)
		k := int(min(end-h.written, int64(len(p))))
		h.piece.Write(p[:k]) // hash.Hash writes never fail
		h.blob.Write(p[:k])
		h.written += int64(k)
		p = p[k:]
		if h.written == end {
			h.finishPiece()
		}
	}
	return n, nil
}

func (h *Hasher) finishPiece() {
	h.sum = h.piece.Sum(h.sum[:0])
	c := cidFromSum(h.sum)
	h.piece.Reset()
	h.pieces = append(h.pieces, c)
	if h.onPiece != nil {
		h.onPiece(len(h.pieces)-1, c)
	}
}

// Pieces returns a copy of the CIDs of the pieces completed so far.
func (h *Hasher) Pieces() []cid.Cid {
	return append([]cid.Cid(nil), h.pieces...)
}

// Digest returns the blob digest as "sha256:<hex>" once all size bytes have
// been written, and "" before that.
func (h *Hasher) Digest() string {
	if h.err != nil || h.written != h.size {
		return ""
	}
	return "sha256:" + hex.EncodeToString(h.blob.Sum(nil))
}
