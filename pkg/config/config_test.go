package config

import (
	"flag"
	"os"
	"path/filepath"
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
