package supernode

import (
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

// TestWithoutIdentityWarnsLoudly: a supernode without --identity gets a new
// peer ID each start, which breaks every agent's --supernode; it says so,
// and with --identity it does not. It also checks its registries at start.
func TestWithoutIdentityWarnsLoudly(t *testing.T) {
	up := testregistry.New(t)
	for _, identity := range []string{"", filepath.Join(t.TempDir(), "identity")} {
		cfg := DefaultConfig()
		cfg.P2PListen = config.Strings{Values: []string{"/ip4/127.0.0.1/tcp/0"}}
		cfg.DataDir = t.TempDir()
		cfg.Registries = config.Strings{Values: []string{up.URL()}}
		cfg.Identity = identity
		core, logs := observer.New(zapcore.InfoLevel)
		s, err := New(cfg, zap.New(core))
		if err != nil {
			t.Fatal(err)
		}
		s.CheckConfig(t.Context())
		s.Close()
		warned := false
		for _, e := range logs.FilterLevelExact(zapcore.WarnLevel).All() {
			warned = warned || strings.Contains(e.Message, "--identity")
		}
		if warned != (identity == "") {
			t.Errorf("identity %q: warned about --identity = %v; logs: %v", identity, warned, logs.All())
		}
		if logs.FilterMessageSnippet("upstream registry check: ok").Len() != 1 {
			t.Errorf("no start-up check line for the registry; logs: %v", logs.All())
		}
	}
}
