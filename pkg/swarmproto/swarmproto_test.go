package swarmproto

import (
	"bytes"
	"strings"
	"testing"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/wire"
)

var digest = "sha256:" + strings.Repeat("ab", 32)

func TestTrackerRequestValidate(t *testing.T) {
	good := TrackerRequest{Op: OpPoll, Digest: digest, Registry: "127.0.0.1:5000", Repo: "library/alpine",
		Addrs: []string{"/ip4/127.0.0.1/tcp/4001"}}
	if err := good.Validate(); err != nil {
		t.Fatalf("valid request rejected: %v", err)
	}
	for name, mutate := range map[string]func(*TrackerRequest){
		"op":       func(r *TrackerRequest) { r.Op = "delete" },
		"digest":   func(r *TrackerRequest) { r.Digest = "sha256:xyz" },
		"registry": func(r *TrackerRequest) { r.Registry = "evil host/../" },
		"repo":     func(r *TrackerRequest) { r.Repo = "UPPER/case" },
		"known":    func(r *TrackerRequest) { r.Known = -1 },
		"addr":     func(r *TrackerRequest) { r.Addrs = []string{"not a multiaddr"} },
		"addrs":    func(r *TrackerRequest) { r.Addrs = make([]string, 17) },
		"auth":     func(r *TrackerRequest) { r.Authorization = strings.Repeat("x", 17<<10) },
	} {
		r := good
		mutate(&r)
		if err := r.Validate(); err == nil {
			t.Errorf("%s: bad request accepted", name)
		}
	}
}

func TestTrackerResponseValidate(t *testing.T) {
	req := &TrackerRequest{Op: OpPoll, Digest: digest, Known: 1}
	c := piece.CID([]byte("x")).String()
	ok := TrackerResponse{Size: 3 << 20, PieceSize: 1 << 20, Pieces: []string{c, c}}
	if err := ok.Validate(req); err != nil {
		t.Fatalf("valid response rejected: %v", err)
	}
	for name, r := range map[string]TrackerResponse{
		"too many pieces": {Size: 3 << 20, PieceSize: 1 << 20, Pieces: []string{c, c, c}},
		"bad cid":         {Size: 3 << 20, PieceSize: 1 << 20, Pieces: []string{"bafy-nope"}},
		"tiny pieces":     {Size: 3 << 20, PieceSize: 1},
		"cids no size":    {Size: -1, Pieces: []string{c}},
		"negative size":   {Size: -2},
		"too many peers":  {Size: 1, PieceSize: 1 << 20, Peers: make([]PeerInfo, MaxPeers+1)},
	} {
		if err := r.Validate(req); err == nil {
			t.Errorf("%s: bad response accepted", name)
		}
	}
}

// FuzzDecode feeds arbitrary frames to the decoders peers reach: nothing
// may panic, and what validates must survive a round trip.
func FuzzDecode(f *testing.F) {
	for _, v := range []any{
		TrackerRequest{Op: OpPoll, Digest: digest, Registry: "docker.io", Repo: "a/b", Have: []byte{0xff}},
		TrackerResponse{Size: 10, PieceSize: 1 << 20, Pieces: []string{piece.CID(nil).String()}},
		PieceRequest{Digest: digest, PieceSize: 1 << 20, Index: 3},
		PieceHeader{Size: 5},
	} {
		var buf bytes.Buffer
		if err := wire.WriteMsg(&buf, v); err != nil {
			f.Fatal(err)
		}
		f.Add(buf.Bytes())
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, frame []byte) {
		var tr TrackerRequest
		if wire.ReadMsg(bytes.NewReader(frame), &tr, MaxRequestBytes) == nil && tr.Validate() == nil {
			var buf bytes.Buffer
			if err := wire.WriteMsg(&buf, tr); err != nil {
				t.Fatal(err)
			}
			var again TrackerRequest
			if err := wire.ReadMsg(&buf, &again, MaxRequestBytes); err != nil || again.Validate() != nil {
				t.Fatalf("valid request did not survive a round trip: %v", err)
			}
		}
		var resp TrackerResponse
		if wire.ReadMsg(bytes.NewReader(frame), &resp, MaxResponseBytes) == nil {
			_ = resp.Validate(&TrackerRequest{})
		}
		var pr PieceRequest
		if wire.ReadMsg(bytes.NewReader(frame), &pr, MaxRequestBytes) == nil && pr.Validate() == nil {
			if pr.Index < 0 || pr.PieceSize < piece.MinSize {
				t.Fatalf("accepted %+v", pr)
			}
		}
	})
}
