// Package piece holds the piece maths and piece identity shared by the seed,
// the tracker, the swarm and the store: how a blob is cut into fixed-size
// pieces, how a piece is named (a CIDv1 over its bytes) and how a blob's
// metainfo is checked.
package piece

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
)

const (
	// DefaultSize is the piece size used unless configured otherwise.
	DefaultSize int64 = 4 << 20
	// MinSize and MaxSize bound the piece size a metainfo may carry. Tiny
	// pieces blow up metainfo and request overhead; huge ones defeat
	// swarming and make a single bad peer expensive.
	MinSize int64 = 64 << 10
	MaxSize int64 = 64 << 20
)

var (
	// ErrMismatch reports that piece bytes do not hash to the expected CID.
	ErrMismatch = errors.New("piece data does not match CID")
	// ErrUnsupportedCID reports a CID that is not CIDv1/raw/sha2-256, the
	// only form Starling produces. It lets callers tell a bad metainfo apart
	// from bad bytes sent by a peer.
	ErrUnsupportedCID = errors.New("unsupported piece CID")
)

// Count returns the number of pieces of a blob. A zero-length blob has no
// pieces; the last piece may be shorter than pieceSize. Non-positive inputs
// give 0.
func Count(blobSize, pieceSize int64) int {
	if blobSize <= 0 || pieceSize <= 0 {
		return 0
	}
	n := blobSize / pieceSize
	if blobSize%pieceSize != 0 {
		n++
	}
	return int(n)
}

// Bounds returns the byte range of piece i. For i outside [0, Count) it
// returns (0, 0) so that a bad index can never address bytes of the blob.
func Bounds(i int, blobSize, pieceSize int64) (off, length int64) {
	if i < 0 || i >= Count(blobSize, pieceSize) {
		return 0, 0
	}
	off = int64(i) * pieceSize
	return off, min(pieceSize, blobSize-off)
}

// Index returns the index of the piece holding byte off, or -1 for a negative
// offset or a non-positive piece size. It does not check off against a blob
// size.
func Index(off, pieceSize int64) int {
	if off < 0 || pieceSize <= 0 {
		return -1
	}
	return int(off / pieceSize)
}

// CID returns the identity of a piece: CIDv1, raw codec, sha2-256 multihash.
func CID(data []byte) cid.Cid {
	sum := sha256.Sum256(data)
	return cidFromSum(sum[:])
}

// cidFromSum builds the piece CID from a sha256 sum. The multihash is built
// by hand (code 0x12, length 0x20) because that cannot fail, unlike
// multihash.Sum.
func cidFromSum(sum []byte) cid.Cid {
	mh := make([]byte, 0, 2+sha256.Size)
	mh = append(mh, multihash.SHA2_256, sha256.Size)
	mh = append(mh, sum...)
	return cid.NewCidV1(cid.Raw, mh)
}

// checkCID rejects any CID that is not of the form CID produces.
func checkCID(c cid.Cid) error {
	if !c.Defined() {
		return fmt.Errorf("%w: undefined", ErrUnsupportedCID)
	}
	p := c.Prefix()
	if p.Version != 1 || p.Codec != cid.Raw || p.MhType != multihash.SHA2_256 || p.MhLength != sha256.Size {
		return fmt.Errorf("%w: %s (want CIDv1 raw sha2-256)", ErrUnsupportedCID, c)
	}
	return nil
}

// Verify checks data against the piece CID want. It returns an error wrapping
// ErrMismatch if the bytes differ and ErrUnsupportedCID if want is not a
// CIDv1/raw/sha2-256 CID.
func Verify(want cid.Cid, data []byte) error {
	if err := checkCID(want); err != nil {
		return fmt.Errorf("verify piece: %w", err)
	}
	if got := CID(data); !got.Equals(want) {
		return fmt.Errorf("verify piece %s (%d bytes): got %s: %w", want, len(data), got, ErrMismatch)
	}
	return nil
}
