package supernode

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/config"
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
