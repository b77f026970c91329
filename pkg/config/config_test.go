package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "1048576": 1 << 20, "4MiB": 4 << 20, "512KiB": 512 << 10, "1.5GiB": 3 << 29,
		"10MB": 10_000_000, "2G": 2 << 30, "7B": 7, " 8 MiB ": 8 << 20,
	} {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "-1", "4XB", "1e30GiB", "four"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) accepted", in)
		}
	}
}

type testConfig struct {
	Listen   string   `yaml:"listen"`
	Registry Strings  `yaml:"registry"`
	Size     Bytes    `yaml:"size"`
	Wait     Duration `yaml:"wait"`
}

func (c *testConfig) bind(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "")
	fs.Var(&c.Registry, "registry", "")
	fs.Var(&c.Size, "size", "")
	fs.Var(&c.Wait, "wait", "")
}

func TestLoadLayersDefaultsFileAndFlags(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	yaml := "listen: 127.0.0.1:6000\nregistry: [a.example.com, b.example.com]\nsize: 4MiB\nwait: 3s\n"
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig{Listen: "default"}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	if err := Load(fs, []string{"--config", path, "--registry", "c.example.com"}, &cfg, cfg.bind); err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:6000" || cfg.Size != 4<<20 || time.Duration(cfg.Wait) != 3*time.Second {
		t.Errorf("file values not applied: %+v", cfg)
	}
	// A flag replaces the file's list rather than appending to it.
	if len(cfg.Registry.Values) != 1 || cfg.Registry.Values[0] != "c.example.com" {
		t.Errorf("registry = %v, want the flag's value only", cfg.Registry.Values)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("lisen: typo\n"), 0o644)
	cfg = testConfig{}
	if err := Load(flag.NewFlagSet("t", flag.ContinueOnError), []string{"--config=" + bad}, &cfg, cfg.bind); err == nil {
		t.Error("an unknown key in the file was accepted")
	}
}

func TestParseBytesKubernetesQuantities(t *testing.T) {
	for in, want := range map[string]int64{
		"50Gi": 50 << 30, "512Mi": 512 << 20, "1Ki": 1 << 10, "2Ti": 2 << 40, "1Pi": 1 << 50,
		"100k": 100_000, "1.5Gi": 3 << 29, "4MiB": 4 << 20,
	} {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"Gi", "-1Gi", "1Xi", "1e30Gi"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) accepted", in)
		}
	}
}

// env is a fixed environment for LoadEnv.
func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestLoadEnvOrderFlagsEnvFileDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("listen: file:1\nsize: 1MiB\nwait: 3s\nregistry: [f.example.com]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig{Listen: "default"}
	e := env(map[string]string{
		"STARLING_CONFIG":   path,
		"STARLING_LISTEN":   "env:2",
		"STARLING_SIZE":     "2Gi",
		"STARLING_REGISTRY": "e1.example.com,e2.example.com",
	})
	if err := LoadEnv(flag.NewFlagSet("t", flag.ContinueOnError), []string{"--size", "512Mi"}, e, &cfg, cfg.bind); err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "env:2" {
		t.Errorf("listen = %q, want the environment's value over the file's", cfg.Listen)
	}
	if cfg.Size != 512<<20 {
		t.Errorf("size = %d, want the flag's value over the environment's", cfg.Size)
	}
	if time.Duration(cfg.Wait) != 3*time.Second {
		t.Errorf("wait = %v, want the file's value (STARLING_CONFIG names the file)", cfg.Wait)
	}
	if got := cfg.Registry.Values; len(got) != 2 || got[0] != "e1.example.com" || got[1] != "e2.example.com" {
		t.Errorf("registry = %v, want the environment's comma-separated list replacing the file's", got)
	}

	// A flag replaces an environment list, as it replaces a file list.
	cfg = testConfig{}
	if err := LoadEnv(flag.NewFlagSet("t", flag.ContinueOnError), []string{"--registry", "c.example.com"}, e, &cfg, cfg.bind); err != nil {
		t.Fatal(err)
	}
	if got := cfg.Registry.Values; len(got) != 1 || got[0] != "c.example.com" {
		t.Errorf("registry = %v, want the flag's value only", got)
	}

	// A bad value in the environment names the variable.
	cfg = testConfig{}
	err := LoadEnv(flag.NewFlagSet("t", flag.ContinueOnError), nil, env(map[string]string{"STARLING_SIZE": "lots"}), &cfg, cfg.bind)
	if err == nil || !strings.Contains(err.Error(), "STARLING_SIZE") {
		t.Errorf("bad STARLING_SIZE: err = %v, want one naming the variable", err)
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("metrics-listen"); got != "STARLING_METRICS_LISTEN" {
		t.Errorf("EnvName = %q", got)
	}
}
