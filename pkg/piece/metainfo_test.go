package piece

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
)

// testMetainfo returns a valid metainfo for a blob of size bytes.
func testMetainfo(t *testing.T, size int64) Metainfo {
	t.Helper()
	blob := bytes.Repeat([]byte("starling"), int(size/8)+1)[:size]
	h := NewHasher(size, MinSize, nil)
	if _, err := h.Write(blob); err != nil {
		t.Fatal(err)
	}
	return Metainfo{Digest: h.Digest(), Size: size, PieceSize: MinSize, Pieces: h.Pieces()}
}

func TestMetainfoValidate(t *testing.T) {
	t.Parallel()
	full := testMetainfo(t, 3*MinSize+5) // 4 pieces
	sum := sha256.Sum256(nil)
	emptyDigest := "sha256:" + hex.EncodeToString(sum[:])

	tests := []struct {
		name       string
		edit       func(m *Metainfo)
		wantFull   bool // Validate passes
		wantPrefix bool // ValidatePrefix passes
	}{
		{name: "valid", edit: func(*Metainfo) {}, wantFull: true, wantPrefix: true},
		{name: "empty blob", edit: func(m *Metainfo) { *m = Metainfo{Digest: emptyDigest, PieceSize: DefaultSize} }, wantFull: true, wantPrefix: true},
		{name: "prefix of pieces", edit: func(m *Metainfo) { m.Pieces = m.Pieces[:2] }, wantPrefix: true},
		{name: "no pieces yet", edit: func(m *Metainfo) { m.Pieces = nil }, wantPrefix: true},
		{name: "too many pieces", edit: func(m *Metainfo) { m.Pieces = append(m.Pieces, m.Pieces[0]) }},
		{name: "undefined piece", edit: func(m *Metainfo) { m.Pieces[1] = cid.Undef }},
		{name: "non-raw piece", edit: func(m *Metainfo) { m.Pieces[0] = cid.NewCidV1(cid.DagCBOR, m.Pieces[0].Hash()) }},
		{name: "negative size", edit: func(m *Metainfo) { m.Size = -1; m.Pieces = nil }},
		{name: "piece size too small", edit: func(m *Metainfo) { m.PieceSize = MinSize - 1 }},
		{name: "piece size too big", edit: func(m *Metainfo) { m.PieceSize = MaxSize + 1 }},
		{name: "piece size zero on empty blob", edit: func(m *Metainfo) { *m = Metainfo{Digest: emptyDigest} }},
		{name: "digest without algorithm", edit: func(m *Metainfo) { m.Digest = strings.TrimPrefix(m.Digest, "sha256:") }},
		{name: "digest wrong algorithm", edit: func(m *Metainfo) { m.Digest = "sha512:" + m.Digest[7:] }},
		{name: "digest uppercase", edit: func(m *Metainfo) { m.Digest = "sha256:" + strings.ToUpper(m.Digest[7:]) }},
		{name: "digest short", edit: func(m *Metainfo) { m.Digest = m.Digest[:70] }},
		{name: "digest not hex", edit: func(m *Metainfo) { m.Digest = m.Digest[:70] + "zz" }},
		{name: "digest empty", edit: func(m *Metainfo) { m.Digest = "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := full
			m.Pieces = append([]cid.Cid(nil), full.Pieces...)
			tt.edit(&m)
			if err := m.Validate(); (err == nil) != tt.wantFull {
				t.Errorf("Validate() = %v, want ok=%v", err, tt.wantFull)
			}
			if err := m.ValidatePrefix(); (err == nil) != tt.wantPrefix {
				t.Errorf("ValidatePrefix() = %v, want ok=%v", err, tt.wantPrefix)
			}
		})
	}
}

func TestMetainfoValidateUnsupportedCID(t *testing.T) {
	t.Parallel()
	m := testMetainfo(t, MinSize)
	m.Pieces[0] = cid.Undef
	if err := m.Validate(); !errors.Is(err, ErrUnsupportedCID) {
		t.Fatalf("Validate() = %v, want ErrUnsupportedCID", err)
	}
}

func TestMetainfoJSON(t *testing.T) {
	t.Parallel()
	m := testMetainfo(t, 2*MinSize+1)
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	// Pieces are plain CID strings, not {"/": ...} objects.
	var raw struct{ Pieces []string }
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatalf("pieces are not a string list: %v in %s", err, b)
	}
	if len(raw.Pieces) != 3 || raw.Pieces[0] != m.Pieces[0].String() {
		t.Fatalf("pieces = %v", raw.Pieces)
	}

	var back Metainfo
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Digest != m.Digest || back.Size != m.Size || back.PieceSize != m.PieceSize || !equalCIDs(back.Pieces, m.Pieces) {
		t.Fatalf("round trip: got %+v, want %+v", back, m)
	}
	if err := back.Validate(); err != nil {
		t.Fatalf("round-tripped metainfo invalid: %v", err)
	}

	// An empty piece list encodes as [], not null.
	empty, err := json.Marshal(Metainfo{Digest: m.Digest, PieceSize: MinSize})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(empty, []byte(`"pieces":[]`)) {
		t.Errorf("empty metainfo = %s, want pieces []", empty)
	}
}

func TestMetainfoJSONInvalid(t *testing.T) {
	t.Parallel()
	d := `"sha256:` + strings.Repeat("a", 64) + `"`
	tests := []struct {
		name string
		in   string
	}{
		{name: "bad cid", in: `{"digest":` + d + `,"size":1,"pieceSize":65536,"pieces":["not-a-cid"]}`},
		{name: "cid not a string", in: `{"digest":` + d + `,"size":1,"pieceSize":65536,"pieces":[{"/":"x"}]}`},
		{name: "unknown field", in: `{"digest":` + d + `,"size":1,"pieceSize":65536,"pieces":[],"extra":1}`},
		{name: "size not a number", in: `{"digest":` + d + `,"size":"1","pieceSize":65536,"pieces":[]}`},
	}
	for _, tt := range tests {
		var m Metainfo
		if err := json.Unmarshal([]byte(tt.in), &m); err == nil {
			t.Errorf("%s: Unmarshal succeeded: %+v", tt.name, m)
		}
	}
	if _, err := json.Marshal(Metainfo{Pieces: []cid.Cid{cid.Undef}}); err == nil {
		t.Error("Marshal with undefined CID succeeded")
	}
}
