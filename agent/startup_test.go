package agent_test

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/p2p"
)

func swarmKeyFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := p2p.WriteSwarmKeyFile(path); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestStartupCheckSaysWhatIsWrong: at start the agent checks each registry
// and supernode once and logs, for each, what it found. A registry named
// without a scheme that speaks plain HTTP, and a supernode on another swarm
// key, are warnings that name the cause; the good ones are info lines.
func TestStartupCheckSaysWhatIsWrong(t *testing.T) {
	good := testregistry.New(t)
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer plain.Close()
	plainHost := strings.TrimPrefix(plain.URL, "http://")

	key := swarmKeyFile(t)
	same, err := p2p.NewHost(p2p.Config{SwarmKeyFile: key}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer same.Close()
	other, err := p2p.NewHost(p2p.Config{SwarmKeyFile: swarmKeyFile(t)}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{good.URL(), plainHost}}
	cfg.Supernodes = config.Strings{Values: []string{p2p.FullAddrs(same)[0], p2p.FullAddrs(other)[0]}}
	cfg.SwarmKey = key
	cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
	core, logs := observer.New(zapcore.InfoLevel)
	a, err := agent.New(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	a.CheckConfig(t.Context())

	find := func(level zapcore.Level, key, value string) map[string]any {
		for _, e := range logs.FilterLevelExact(level).All() {
			if m := e.ContextMap(); m[key] == value {
				return m
			}
		}
		t.Errorf("no %s line for %s=%s; logs: %v", level, key, value, logs.All())
		return map[string]any{}
	}
	goodHost := strings.TrimPrefix(good.URL(), "http://")
	if m := find(zapcore.InfoLevel, "registry", goodHost); m["tls"] != false || m["auth_required"] != false {
		t.Errorf("good registry: %v, want plain HTTP without auth", m)
	}
	if m := find(zapcore.WarnLevel, "registry", plainHost); m["cause"] != "server gave HTTP response to HTTPS client" || !strings.Contains(m["hint"].(string), "http://"+plainHost) {
		t.Errorf("plain registry named as HTTPS: %v, want the cause and a hint to write http://", m)
	}
	find(zapcore.InfoLevel, "supernode", p2p.FullAddrs(same)[0])
	if m := find(zapcore.WarnLevel, "supernode", p2p.FullAddrs(other)[0]); !strings.Contains(m["cause"].(string), "swarm keys differ") {
		t.Errorf("supernode on another swarm key: %v, want the cause to say the swarm keys differ", m)
	}
}

// TestOneInfoLinePerFilledBlob: a pull that succeeds says so at info, one
// line per blob filled, with its size, where the bytes came from and how
// long it took.
func TestOneInfoLinePerFilledBlob(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 64<<10)
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: []string{up.URL()}}
	cfg.Prefetch = false
	core, logs := observer.New(zapcore.InfoLevel)
	a, err := agent.New(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	mirror := httptest.NewServer(a.Handler())
	closed := false
	defer func() {
		if !closed {
			mirror.Close()
			a.Close()
		}
	}()
	pull(t, mirror, "app:v1")
	pull(t, mirror, "app:v1") // served from the store: no more lines
	// A fill logs its line after it commits, which can be after the client
	// has every byte; Close waits for the fills to end.
	mirror.Close()
	a.Close()
	closed = true

	sizes := map[string]int64{}
	layers, _ := img.Layers()
	for _, l := range layers {
		sizes[must(l.Digest()).String()] = must(l.Size())
	}
	cfgName, _ := img.ConfigName()
	cfgBytes, _ := img.RawConfigFile()
	sizes[cfgName.String()] = int64(len(cfgBytes))

	lines := logs.FilterMessage("blob filled").All()
	if len(lines) != len(sizes) {
		t.Fatalf("%d 'blob filled' lines, want %d (one per blob); logs: %v", len(lines), len(sizes), logs.All())
	}
	for _, e := range lines {
		m := e.ContextMap()
		d, _ := m["digest"].(string)
		want, ok := sizes[d]
		if !ok || m["bytes"] != want || m["from_upstream"] != want || m["from_peers"] != int64(0) || m["from_seed"] != int64(0) || m["elapsed"] == nil {
			t.Errorf("line %v, want digest of a blob, bytes=from_upstream=%d, nothing from peers or seed, elapsed", m, want)
		}
		delete(sizes, d)
	}
}
