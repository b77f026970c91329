package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFileErrorsNameKeyLineAndClosestKey: a bad value or an unknown key in
// the YAML file is reported with the key, its line, and for an unknown key
// the closest valid one; no Go type names.
func TestFileErrorsNameKeyLineAndClosestKey(t *testing.T) {
	for _, tt := range []struct {
		name, yaml string
		want       []string
	}{
		{"bad value", "listen: 127.0.0.1:6000\n\nsize: lots\n", []string{"line 3", `"size"`, `invalid byte count "lots"`}},
		{"unknown key", "listen: x\nregistery: a.example.com\n", []string{"line 2", `unknown key "registery"`, `did you mean "registry"`}},
		{"wrong shape", "wait:\n  - 3s\n", []string{"line 2", `"wait"`}},
		{"twice", "listen: a\nlisten: b\n", []string{"line 2", `"listen"`, "twice"}},
		{"not a mapping", "- listen\n", []string{"line 1", "key: value"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(path, []byte(tt.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := testConfig{}
			err := Load(flag.NewFlagSet("t", flag.ContinueOnError), []string{"--config", path}, &cfg, cfg.bind)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %s", err, w)
				}
			}
			if strings.Contains(err.Error(), "config.testConfig") || strings.Contains(err.Error(), "!!") {
				t.Errorf("error %q names Go or YAML internals", err)
			}
		})
	}
}

func TestUnknownFlagSuggestsClosest(t *testing.T) {
	cfg := testConfig{}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	err := Load(fs, []string{"--registery", "a.example.com"}, &cfg, cfg.bind)
	if err == nil || !strings.Contains(err.Error(), "registery") || !strings.Contains(err.Error(), `did you mean --registry`) {
		t.Fatalf("Load = %v, want an error naming the flag and suggesting --registry", err)
	}
}
