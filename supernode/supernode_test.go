package supernode

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/supernode/tracker"
)

func TestStatusEndpoints(t *testing.T) {
	cfg := DefaultConfig()
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{"http://127.0.0.1:1"}}
	s, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()

	get := func(path string) string {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", path, resp.StatusCode)
		}
		return string(b)
	}
	if got := get("/healthz"); got != "ok\n" {
		t.Fatalf("/healthz = %q", got)
	}
	if m := get("/metrics"); !strings.Contains(m, "starling_seed_fetches_total 0") || !strings.Contains(m, "starling_piece_bytes_served_total 0") {
		t.Fatalf("/metrics lacks the counters:\n%s", m)
	}
	var st struct {
		PeerID string   `json:"peer_id"`
		Addrs  []string `json:"addrs"`
	}
	if err := json.Unmarshal([]byte(get("/status")), &st); err != nil || st.PeerID != s.Host().ID().String() || len(st.Addrs) == 0 {
		t.Fatalf("/status = %+v, %v", st, err)
	}
}

// A blob the supernode has whole but whose piece table was lost (a crash
// between commit and recording it) is re-hashed and published, without
// asking upstream.
func TestCompleteBlobWithoutPieceTableIsRepublished(t *testing.T) {
	cfg := DefaultConfig()
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{"http://127.0.0.1:1"}} // unreachable on purpose
	cfg.PieceSize = 64 << 10
	s, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	blob := bytes.Repeat([]byte("starling"), 40_000) // 320 000 bytes: 5 pieces
	sum := sha256.Sum256(blob)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	p, err := s.store.OpenPartial(digest, int64(len(blob)), int64(cfg.PieceSize))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	p.Release()

	// Answers never wait: poll at the tracker's interval until the seed has
	// published the table (the first poll starts it).
	var resp *swarmproto.TrackerResponse
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp = s.tracker.Serve(time.Now(), tracker.Asker{ID: "agent"}, &swarmproto.TrackerRequest{
			Op: swarmproto.OpPoll, Digest: digest, Registry: "127.0.0.1:1", Repo: "app", Want: -1,
		})
		if resp.Error != "" || resp.Size >= 0 || time.Now().After(deadline) {
			break
		}
		<-time.After(time.Duration(resp.Interval) * time.Millisecond)
	}
	if resp.Error != "" || resp.Size != int64(len(blob)) || len(resp.Pieces) != 5 {
		t.Fatalf("poll: error %q, size %d, %d pieces; want %d bytes in 5 pieces", resp.Error, resp.Size, len(resp.Pieces), len(blob))
	}
	if s.SeedFetches() != 0 {
		t.Fatalf("seed went upstream %d times for a blob it had", s.SeedFetches())
	}
}
