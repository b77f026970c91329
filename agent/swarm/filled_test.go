package swarm_test

import (
	"net/http/httptest"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

// TestFilledLineSplitsSwarmBytes: a blob brought in over the swarm is one
// "blob filled" line whose split says where its bytes came from: all of
// them from peers and seed, none from upstream.
func TestFilledLineSplitsSwarmBytes(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "team/app:v1", 2, 1<<20)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)

	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{up.URL()}}
	cfg.Supernodes = config.Strings{Values: sn.Addrs()}
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	cfg.SwarmKey = key
	cfg.StallTimeout = config.Duration(30 * time.Second)
	core, logs := observer.New(zapcore.InfoLevel)
	a, err := agent.New(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	closed := false
	defer func() {
		if !closed {
			srv.Close()
			a.Close()
		}
	}()
	if err := pull(srv.URL, "team/app:v1"); err != nil {
		t.Fatal(err)
	}
	// A fill logs its line after it commits, which can be after the client
	// has every byte; Close waits for the fills to end.
	srv.Close()
	a.Close()
	closed = true

	lines := logs.FilterMessage("blob filled").All()
	layers, _ := img.Layers()
	if len(lines) != len(layers)+1 {
		t.Fatalf("%d 'blob filled' lines, want %d", len(lines), len(layers)+1)
	}
	for _, e := range lines {
		m := e.ContextMap()
		bytes, _ := m["bytes"].(int64)
		peers, _ := m["from_peers"].(int64)
		seed, _ := m["from_seed"].(int64)
		if m["from_upstream"] != int64(0) || peers+seed != bytes || bytes == 0 {
			t.Errorf("%v: want every byte from peers or seed, none from upstream", m)
		}
	}
}
