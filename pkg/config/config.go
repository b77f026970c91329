// Package config loads a command's settings: defaults, then a YAML file
// (given by --config or STARLING_CONFIG), then STARLING_<FLAG> environment
// variables, then command-line flags, each overriding the last. Every flag
// is also a YAML key of the same name.
package config

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Load fills cfg from the YAML file named by --config in args (if any) and
// then from the flags that bind registers on fs (bound to cfg's fields, so
// that file values become the flags' defaults).
func Load(fs *flag.FlagSet, args []string, cfg any, bind func(fs *flag.FlagSet)) error {
	return LoadEnv(fs, args, nil, cfg, bind)
}

// EnvName is the environment variable that sets a flag: STARLING_ and the
// flag's name in upper case with dashes as underscores.
func EnvName(flagName string) string {
	return "STARLING_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// LoadEnv is Load with environment variables (looked up through env, e.g.
// os.LookupEnv; nil = none) between the file and the flags: a flag not
// given in args takes the value of its EnvName variable when that is set.
// A repeatable flag's variable is a comma-separated list.
func LoadEnv(fs *flag.FlagSet, args []string, env func(string) (string, bool), cfg any, bind func(fs *flag.FlagSet)) error {
	if env == nil {
		env = func(string) (string, bool) { return "", false }
	}
	path := findConfigFlag(args)
	if path == "" {
		path, _ = env(EnvName("config"))
	}
	if path != "" {
		raw, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read config: %w", err)
		}
		if err := decodeFile(path, raw, cfg); err != nil {
			return err
		}
	}
	fs.String("config", path, "YAML file with settings; flags override it")
	bind(fs)
	if err := fs.Parse(args); err != nil {
		return flagError(fs, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	return applyEnv(fs, env)
}

// applyEnv sets every flag that the command line left alone from its
// environment variable, if set.
func applyEnv(fs *flag.FlagSet, env func(string) (string, bool)) error {
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if onCommandLine[f.Name] || f.Name == "config" {
			return
		}
		v, ok := env(EnvName(f.Name))
		if !ok {
			return
		}
		values := []string{v}
		if _, list := f.Value.(*Strings); list {
			values = strings.Split(v, ",")
		}
		for _, one := range values {
			if err := fs.Set(f.Name, strings.TrimSpace(one)); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", EnvName(f.Name), v, err))
				return
			}
		}
	})
	return errors.Join(errs...)
}

func findConfigFlag(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		for _, name := range []string{"-config", "--config"} {
			if a == name && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, name+"="); ok {
				return v
			}
		}
	}
	return ""
}

// Strings is a repeatable flag; a flag on the command line replaces the
// list from the file rather than adding to it.
type Strings struct {
	Values []string
	set    bool
}

func (s *Strings) String() string { return strings.Join(s.Values, ",") }

// Set implements flag.Value.
func (s *Strings) Set(v string) error {
	if !s.set {
		s.Values, s.set = nil, true
	}
	s.Values = append(s.Values, v)
	return nil
}

// UnmarshalYAML accepts a list or a single string.
func (s *Strings) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		s.Values = []string{n.Value}
		return nil
	}
	return n.Decode(&s.Values)
}

// Bytes is a byte count written as 1048576, 512KiB, 4MiB, 10GB, or as a
// Kubernetes quantity (512Mi, 50Gi, 100k).
type Bytes int64

// units are tried in order, so longer suffixes come first. K, M and G
// alone stay binary as they always were here (Kubernetes reads M and G as
// decimal: write Mi and Gi, which mean the same in both).
var units = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"Pi", 1 << 50}, {"Ei", 1 << 60},
	{"k", 1e3}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
}

// ParseBytes parses a byte count with an optional unit.
func ParseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	if f, err := strconv.ParseFloat(t, 64); err == nil && f >= 0 && t != "" {
		v := f * float64(mult)
		if v > 1<<62 {
			return 0, fmt.Errorf("byte count %q too large", s)
		}
		return int64(v), nil
	}
	return 0, fmt.Errorf("invalid byte count %q (want e.g. 1048576, 512KiB, 4MiB, 50Gi)", s)
}

func (b *Bytes) String() string { return strconv.FormatInt(int64(*b), 10) }

// Set implements flag.Value.
func (b *Bytes) Set(v string) error {
	n, err := ParseBytes(v)
	if err != nil {
		return err
	}
	*b = Bytes(n)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (b *Bytes) UnmarshalYAML(n *yaml.Node) error { return b.Set(n.Value) }

// Duration is a time.Duration written as in Go ("30s", "5m").
type Duration time.Duration

func (d *Duration) String() string { return time.Duration(*d).String() }

// Set implements flag.Value.
func (d *Duration) Set(v string) error {
	t, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("invalid duration %q: %w", v, err)
	}
	*d = Duration(t)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error { return d.Set(n.Value) }
