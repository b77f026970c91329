package piece

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/ipfs/go-cid"
)

// Metainfo describes how a blob is cut into pieces and names every piece.
// It travels between peers, so everything in it is validated before use.
type Metainfo struct {
	Digest    string // "sha256:<64 lowercase hex>"
	Size      int64
	PieceSize int64
	Pieces    []cid.Cid
}

// metainfoJSON is the wire form: pieces as plain CID strings rather than
// go-cid's {"/": "..."} objects, which are bulkier and IPLD-specific.
type metainfoJSON struct {
	Digest    string   `json:"digest"`
	Size      int64    `json:"size"`
	PieceSize int64    `json:"pieceSize"`
	Pieces    []string `json:"pieces"`
}

// MarshalJSON encodes pieces as a list of CID strings.
func (m Metainfo) MarshalJSON() ([]byte, error) {
	pieces := make([]string, len(m.Pieces))
	for i, c := range m.Pieces {
		if !c.Defined() {
			return nil, fmt.Errorf("marshal metainfo %s: piece %d: undefined CID", m.Digest, i)
		}
		pieces[i] = c.String()
	}
	return json.Marshal(metainfoJSON{Digest: m.Digest, Size: m.Size, PieceSize: m.PieceSize, Pieces: pieces})
}

// UnmarshalJSON decodes the form written by MarshalJSON. Unknown fields are
// rejected here too, because a custom unmarshaler does not inherit
// DisallowUnknownFields from the outer decoder. It parses the CIDs but does
// not validate the metainfo: call Validate or ValidatePrefix.
func (m *Metainfo) UnmarshalJSON(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var w metainfoJSON
	if err := dec.Decode(&w); err != nil {
		return fmt.Errorf("decode metainfo: %w", err)
	}
	var pieces []cid.Cid
	if w.Pieces != nil {
		pieces = make([]cid.Cid, len(w.Pieces))
	}
	for i, s := range w.Pieces {
		c, err := cid.Decode(s)
		if err != nil {
			return fmt.Errorf("decode metainfo %s: piece %d: %w", w.Digest, i, err)
		}
		pieces[i] = c
	}
	*m = Metainfo{Digest: w.Digest, Size: w.Size, PieceSize: w.PieceSize, Pieces: pieces}
	return nil
}

// Validate checks a complete metainfo: digest syntax, sizes, and exactly one
// well-formed CID per piece.
func (m *Metainfo) Validate() error {
	if err := m.validate(); err != nil {
		return err
	}
	if want := Count(m.Size, m.PieceSize); len(m.Pieces) != want {
		return fmt.Errorf("metainfo %s: %d piece CIDs, want %d", m.Digest, len(m.Pieces), want)
	}
	return nil
}

// ValidatePrefix is Validate for a metainfo still being published by the
// seed: it accepts the CIDs of the first len(Pieces) pieces only.
func (m *Metainfo) ValidatePrefix() error {
	if err := m.validate(); err != nil {
		return err
	}
	if limit := Count(m.Size, m.PieceSize); len(m.Pieces) > limit {
		return fmt.Errorf("metainfo %s: %d piece CIDs, want at most %d", m.Digest, len(m.Pieces), limit)
	}
	return nil
}

// validate checks everything but the number of pieces.
func (m *Metainfo) validate() error {
	if err := checkDigest(m.Digest); err != nil {
		return fmt.Errorf("metainfo: %w", err)
	}
	if m.Size < 0 {
		return fmt.Errorf("metainfo %s: negative size %d", m.Digest, m.Size)
	}
	if m.PieceSize < MinSize || m.PieceSize > MaxSize {
		return fmt.Errorf("metainfo %s: piece size %d outside [%d, %d]", m.Digest, m.PieceSize, MinSize, MaxSize)
	}
	for i, c := range m.Pieces {
		if err := checkCID(c); err != nil {
			return fmt.Errorf("metainfo %s: piece %d: %w", m.Digest, i, err)
		}
	}
	return nil
}

// checkDigest accepts only the canonical "sha256:" + 64 lowercase hex form, so
// that one blob cannot hide behind two spellings (for example in store keys).
// Errors quote at most 80 characters of what a peer sent.
func checkDigest(d string) error {
	hexPart, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(hexPart) != 64 {
		return fmt.Errorf("invalid digest %.80q: want sha256:<64 hex>", d)
	}
	if strings.ToLower(hexPart) != hexPart {
		return fmt.Errorf("invalid digest %.80q: hex must be lowercase", d)
	}
	if _, err := hex.DecodeString(hexPart); err != nil {
		return fmt.Errorf("invalid digest %.80q: %w", d, err)
	}
	return nil
}
