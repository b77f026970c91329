package config

import (
	"errors"
	"flag"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// decodeFile applies a YAML settings file to cfg, a pointer to a struct
// whose fields carry yaml tags. It decodes key by key so that every error
// names the key and its line, and an unknown key the closest valid one.
func decodeFile(path string, raw []byte, cfg any) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if len(doc.Content) == 0 {
		return nil // empty file
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
			return nil // only comments
		}
		return fmt.Errorf("config %s line %d: want settings as key: value lines", path, root.Line)
	}
	fields, names := yamlFields(cfg)
	seen := map[string]int{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if first, ok := seen[k.Value]; ok {
			return fmt.Errorf("config %s line %d: key %q given twice (first on line %d)", path, k.Line, k.Value, first)
		}
		seen[k.Value] = k.Line
		f, ok := fields[k.Value]
		if !ok {
			return fmt.Errorf("config %s line %d: unknown key %q%s", path, k.Line, k.Value, suggest(k.Value, names, `did you mean "%s"?`))
		}
		if err := v.Decode(f.Addr().Interface()); err != nil {
			return fmt.Errorf("config %s line %d: key %q: %s", path, v.Line, k.Value, cleanYAMLError(err))
		}
	}
	return nil
}

// yamlFields maps the yaml keys of the struct cfg points to onto its fields.
func yamlFields(cfg any) (map[string]reflect.Value, []string) {
	v := reflect.ValueOf(cfg)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		panic(fmt.Sprintf("config: settings must be a pointer to a struct, not %T", cfg)) // a programming error
	}
	v = v.Elem()
	fields := map[string]reflect.Value{}
	var names []string
	for i := range v.NumField() {
		sf := v.Type().Field(i)
		name, _, _ := strings.Cut(sf.Tag.Get("yaml"), ",")
		if name == "" || name == "-" || !sf.IsExported() {
			continue
		}
		fields[name] = v.Field(i)
		names = append(names, name)
	}
	sort.Strings(names)
	return fields, names
}

var yamlLinePrefix = regexp.MustCompile(`^yaml: (unmarshal errors:\s*)?(line \d+: )?`)

// cleanYAMLError drops yaml.v3's prefixes and its Go and YAML type names.
func cleanYAMLError(err error) string {
	msg := yamlLinePrefix.ReplaceAllString(err.Error(), "")
	if strings.Contains(msg, "cannot unmarshal") {
		kind := "a value"
		switch {
		case strings.Contains(msg, "!!seq"):
			kind = "a list"
		case strings.Contains(msg, "!!map"):
			kind = "a mapping"
		case strings.Contains(msg, "!!str"):
			kind = "text"
		}
		return "wrong kind of value: got " + kind
	}
	return msg
}

// suggest returns " (" + format of the closest candidate + ")" when one is
// close enough to be a likely typo, else "".
func suggest(name string, candidates []string, format string) string {
	best, bestD := "", len(name)/2+2
	for _, c := range candidates {
		if d := editDistance(name, c); d < bestD {
			best, bestD = c, d
		}
	}
	if best == "" {
		return ""
	}
	return " (" + fmt.Sprintf(format, best) + ")"
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// flagError adds the closest defined flag to "flag provided but not
// defined" errors.
func flagError(fs *flag.FlagSet, err error) error {
	const undefined = "flag provided but not defined: -"
	msg := err.Error()
	name, ok := strings.CutPrefix(msg, undefined)
	if !ok {
		return err
	}
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	if s := suggest(strings.TrimPrefix(name, "-"), names, "did you mean --%s?"); s != "" {
		return errors.New(msg + s)
	}
	return err
}
