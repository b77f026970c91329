// Package docs_test keeps the configuration reference in docs/ and the
// README, and the example configuration under deploy/, true to the code.
// The directory holds no Go code besides these tests.
package docs_test

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/nodeconfig"
	"github.com/starling-oci/starling/supernode"
)

// command is one starling subcommand whose flags are documented.
type command struct {
	name  string // as in the doc markers: <!-- flags:NAME --> ... <!-- /flags:NAME -->
	flags func(t *testing.T) *flag.FlagSet
	cfg   func() any // a pointer to the command's default Config
}

var commands = []command{
	{
		name: "agent",
		flags: func(t *testing.T) *flag.FlagSet {
			cfg := agent.DefaultConfig()
			return flagSet(t, "agent", &cfg, cfg.BindFlags)
		},
		cfg: func() any { c := agent.DefaultConfig(); return &c },
	},
	{
		name: "configure",
		flags: func(t *testing.T) *flag.FlagSet {
			cfg := nodeconfig.DefaultConfig()
			return flagSet(t, "configure", &cfg, cfg.BindFlags)
		},
		cfg: func() any { c := nodeconfig.DefaultConfig(); return &c },
	},
	{
		name: "supernode",
		flags: func(t *testing.T) *flag.FlagSet {
			cfg := supernode.DefaultConfig()
			return flagSet(t, "supernode", &cfg, cfg.BindFlags)
		},
		cfg: func() any { c := supernode.DefaultConfig(); return &c },
	},
}

// flagSet registers a command's flags exactly as cmd/starling does,
// including --config, which config.Load adds.
func flagSet(t *testing.T, name string, cfg any, bind func(*flag.FlagSet)) *flag.FlagSet {
	t.Helper()
	fs := flag.NewFlagSet("starling "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if err := config.Load(fs, nil, cfg, bind); err != nil {
		t.Fatalf("load %s flags: %v", name, err)
	}
	return fs
}

// docRow is one row of a flag table: | `--name` | `default` | meaning |.
type docRow struct {
	def  string // the default cell, trimmed
	line int
}

var rowPattern = regexp.MustCompile("^\\|\\s*`--([a-z0-9-]+)`\\s*\\|([^|]*)\\|")

// flagTable extracts the rows between <!-- flags:NAME --> and
// <!-- /flags:NAME --> in a markdown file.
func flagTable(t *testing.T, path, name string) map[string]docRow {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	begin, end := "<!-- flags:"+name+" -->", "<!-- /flags:"+name+" -->"
	text := string(b)
	i, j := strings.Index(text, begin), strings.Index(text, end)
	if i < 0 || j < i {
		t.Fatalf("%s: no %s ... %s block", path, begin, end)
	}
	firstLine := strings.Count(text[:i], "\n") + 1
	rows := map[string]docRow{}
	for k, line := range strings.Split(text[i:j], "\n") {
		m := rowPattern.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		if _, dup := rows[m[1]]; dup {
			t.Errorf("%s:%d: --%s documented twice for %s", path, firstLine+k, m[1], name)
		}
		rows[m[1]] = docRow{def: strings.TrimSpace(m[2]), line: firstLine + k}
	}
	return rows
}

// defaultMatches reports whether a documented default cell agrees with the
// flag's default: an empty default is written "none" (or left empty);
// anything else appears in backquotes.
func defaultMatches(cell, def string) bool {
	if def == "" {
		return cell == "" || cell == "none"
	}
	return strings.Contains(cell, "`"+def+"`")
}

// TestFlagsAreDocumented fails when a flag is missing from the flag tables
// of docs/CONFIGURATION.md or README.md, when a documented flag no longer
// exists, or when a documented default differs from the code's.
func TestFlagsAreDocumented(t *testing.T) {
	for _, doc := range []string{"CONFIGURATION.md", filepath.Join("..", "README.md")} {
		for _, c := range commands {
			t.Run(filepath.Base(doc)+"/"+c.name, func(t *testing.T) {
				fs := c.flags(t)
				rows := flagTable(t, doc, c.name)
				fs.VisitAll(func(f *flag.Flag) {
					row, ok := rows[f.Name]
					if !ok {
						t.Errorf("%s: flag --%s of starling %s is not documented", doc, f.Name, c.name)
						return
					}
					if !defaultMatches(row.def, f.DefValue) {
						want := "`" + f.DefValue + "`"
						if f.DefValue == "" {
							want = "none"
						}
						t.Errorf("%s:%d: --%s default documented as %q; the code's default is %s", doc, row.line, f.Name, row.def, want)
					}
				})
				for name, row := range rows {
					if fs.Lookup(name) == nil {
						t.Errorf("%s:%d: --%s is documented for starling %s but has no such flag", doc, row.line, name, c.name)
					}
				}
			})
		}
	}
}

// TestYAMLKeysAreFlagNames pins the documented rule that every flag is also
// a YAML key of the same name (and --config is the only flag that is not).
func TestYAMLKeysAreFlagNames(t *testing.T) {
	for _, c := range commands {
		t.Run(c.name, func(t *testing.T) {
			fs := c.flags(t)
			keys := map[string]bool{}
			typ := reflect.TypeOf(c.cfg()).Elem()
			for i := range typ.NumField() {
				key, _, _ := strings.Cut(typ.Field(i).Tag.Get("yaml"), ",")
				if key == "" || key == "-" {
					t.Errorf("field %s.%s has no YAML key", typ.Name(), typ.Field(i).Name)
					continue
				}
				keys[key] = true
				if fs.Lookup(key) == nil {
					t.Errorf("YAML key %q of starling %s is not a flag", key, c.name)
				}
			}
			fs.VisitAll(func(f *flag.Flag) {
				if f.Name != "config" && !keys[f.Name] {
					t.Errorf("flag --%s of starling %s is not a YAML key", f.Name, c.name)
				}
			})
		})
	}
}

// TestDeployManifestsParse checks every YAML document under deploy/, and
// loads the starling configuration embedded in ConfigMaps (data keys
// agent.yaml and supernode.yaml) the way the binary does: unknown keys are
// errors, and the result must pass the command's validation.
func TestDeployManifestsParse(t *testing.T) {
	var files []string
	err := filepath.WalkDir(filepath.Join("..", "deploy"), func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		// Helm templates are not YAML until rendered; deploy/helm/charttest
		// renders them and loads their configuration the same way.
		if d.IsDir() && d.Name() == "templates" {
			return filepath.SkipDir
		}
		if !d.IsDir() && (strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no YAML files under deploy/")
	}
	embedded := 0
	for _, path := range files {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(raw))
		for n := 0; ; n++ {
			var doc map[string]any
			if err := dec.Decode(&doc); err == io.EOF {
				break
			} else if err != nil {
				t.Errorf("%s: document %d: %v", path, n, err)
				break
			}
			if doc == nil {
				continue
			}
			if doc["kind"] != "ConfigMap" {
				continue
			}
			data, _ := doc["data"].(map[string]any)
			for key, v := range data {
				text, _ := v.(string)
				switch key {
				case "agent.yaml":
					cfg := agent.DefaultConfig()
					loadEmbedded(t, path, key, text, &cfg, cfg.BindFlags)
					if err := cfg.Validate(); err != nil {
						t.Errorf("%s: %s: %v", path, key, err)
					}
					embedded++
				case "supernode.yaml":
					cfg := supernode.DefaultConfig()
					loadEmbedded(t, path, key, text, &cfg, cfg.BindFlags)
					if err := cfg.Validate(); err != nil {
						t.Errorf("%s: %s: %v", path, key, err)
					}
					embedded++
				}
			}
		}
	}
	if embedded < 2 {
		t.Errorf("found %d embedded starling configurations under deploy/, want the agent's and the supernode's", embedded)
	}
}

func loadEmbedded(t *testing.T, path, key, text string, cfg any, bind func(*flag.FlagSet)) {
	t.Helper()
	file := filepath.Join(t.TempDir(), key)
	if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := flag.NewFlagSet(key, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if err := config.Load(fs, []string{"--config", file}, cfg, bind); err != nil {
		t.Errorf("%s: %s: %v", path, key, fmt.Errorf("load as starling config: %w", err))
	}
}
