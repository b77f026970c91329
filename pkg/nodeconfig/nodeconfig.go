// Package nodeconfig writes the container runtimes' registry configuration
// that points a node at its Starling agent (`starling configure`), and takes
// it away again (`--remove`). It is idempotent, keeps whatever the operator
// had (kept aside and restored, or merged key by key), and never restarts a
// runtime: it says what it wrote and what the runtime needs to notice.
package nodeconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"

	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/upstream"
)

// Marker starts every file this package writes; a file without it is the
// operator's and is kept aside, never overwritten.
const Marker = "# Managed by starling configure; `starling configure --remove` takes it away."

// BackupSuffix is appended to an operator's hosts.toml that configure set
// aside; --remove puts it back.
const BackupSuffix = ".starling-orig"

// DropInName is the CRI-O / podman drop-in's file name: late in the
// directory's order, so it overrides earlier entries for the same prefix.
const DropInName = "99-starling.conf"

// Runtimes configure knows.
const (
	Containerd = "containerd"
	CRIO       = "crio"
	Docker     = "docker"
)

// Config says what to configure; each field is a flag of `starling
// configure` and a YAML key.
type Config struct {
	// Mirror is the agent's mirror URL as the node reaches it.
	Mirror string `yaml:"mirror"`
	// Registries are the agent's --registry values; the first is its
	// default (the only one CRI-O and Docker can use, as they send no ns).
	Registries config.Strings `yaml:"registry"`
	// Runtimes to configure: containerd, crio, docker.
	Runtimes config.Strings `yaml:"runtime"`
	// ContainerdDir is containerd's certs.d directory (its CRI registry
	// config_path).
	ContainerdDir string `yaml:"containerd-config-path"`
	// ContainerdDefault also writes _default/hosts.toml: every registry
	// goes through the mirror first (the agent refuses the ones it does not
	// mirror and containerd then goes to them directly).
	ContainerdDefault bool `yaml:"containerd-default"`
	// CRIODir is the registries.conf.d drop-in directory.
	CRIODir string `yaml:"crio-config-path"`
	// DockerConfig is dockerd's daemon.json.
	DockerConfig string `yaml:"docker-config"`
	// Remove takes the configuration away instead.
	Remove bool `yaml:"remove"`
}

// DefaultConfig returns the defaults: containerd only, at the standard
// paths, pointing at the agent's default mirror address.
func DefaultConfig() Config {
	return Config{
		Mirror:        "http://127.0.0.1:5000",
		Runtimes:      config.Strings{Values: []string{Containerd}},
		ContainerdDir: "/etc/containerd/certs.d",
		CRIODir:       "/etc/containers/registries.conf.d",
		DockerConfig:  "/etc/docker/daemon.json",
	}
}

// BindFlags registers configure's flags on fs, bound to c.
func (c *Config) BindFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Mirror, "mirror", c.Mirror, "the agent's mirror URL as the node reaches it")
	fs.Var(&c.Registries, "registry", "a registry the agent mirrors, as in its --registry (repeatable; the first is its default)")
	fs.Var(&c.Runtimes, "runtime", "runtime to configure: containerd, crio or docker (repeatable)")
	fs.StringVar(&c.ContainerdDir, "containerd-config-path", c.ContainerdDir, "containerd's certs.d directory (its CRI registry config_path)")
	fs.BoolVar(&c.ContainerdDefault, "containerd-default", c.ContainerdDefault, "also write _default/hosts.toml: every registry tries the mirror first")
	fs.StringVar(&c.CRIODir, "crio-config-path", c.CRIODir, "CRI-O / podman registries.conf.d directory")
	fs.StringVar(&c.DockerConfig, "docker-config", c.DockerConfig, "dockerd's daemon.json")
	fs.BoolVar(&c.Remove, "remove", c.Remove, "remove what configure wrote and restore the files it kept aside")
}

// Apply writes (or with Remove, removes) the configuration and returns one
// line per thing done or left as it was, followed by what each runtime
// needs to pick it up.
func Apply(o Config) ([]string, error) {
	mirror, err := url.Parse(o.Mirror)
	if err != nil || (mirror.Scheme != "http" && mirror.Scheme != "https") || mirror.Host == "" {
		return nil, fmt.Errorf("--mirror %q: want http://host:port or https://host:port", o.Mirror)
	}
	if len(o.Registries.Values) == 0 {
		return nil, errors.New("at least one --registry is required (the agent's)")
	}
	regs := make([]upstream.Registry, 0, len(o.Registries.Values))
	for _, s := range o.Registries.Values {
		r, err := upstream.ParseRegistry(s)
		if err != nil {
			return nil, err
		}
		regs = append(regs, r)
	}
	if len(o.Runtimes.Values) == 0 {
		return nil, errors.New("no --runtime given (containerd, crio, docker)")
	}
	var report []string
	for _, rt := range o.Runtimes.Values {
		var lines []string
		switch rt {
		case Containerd:
			lines, err = containerd(o, mirror, regs)
		case CRIO:
			lines, err = crio(o, mirror, regs[0])
		case Docker:
			lines, err = docker(o, mirror, regs[0])
		default:
			return report, fmt.Errorf("--runtime %q: want containerd, crio or docker", rt)
		}
		report = append(report, lines...)
		if err != nil {
			return report, fmt.Errorf("%s: %w", rt, err)
		}
	}
	return report, nil
}

// hostsToml is containerd's hosts.toml for one registry: the mirror first,
// the registry itself (server) as the fallback. server is empty for
// _default, where containerd falls back to the host being pulled from.
func hostsToml(server string, mirror *url.URL) []byte {
	var b bytes.Buffer
	b.WriteString(Marker + "\n")
	if server != "" {
		fmt.Fprintf(&b, "server = %q\n", server)
	}
	fmt.Fprintf(&b, "\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror.Scheme+"://"+mirror.Host)
	return b.Bytes()
}

func containerd(o Config, mirror *url.URL, regs []upstream.Registry) ([]string, error) {
	if o.ContainerdDir == "" {
		return nil, errors.New("--containerd-config-path is empty")
	}
	type entry struct{ dir, server string }
	var entries []entry
	for _, r := range regs {
		entries = append(entries, entry{r.Host, r.Endpoint.String()})
	}
	if o.ContainerdDefault {
		entries = append(entries, entry{"_default", ""})
	}
	var report []string
	for _, e := range entries {
		path := filepath.Join(o.ContainerdDir, e.dir, "hosts.toml")
		var line string
		var err error
		if o.Remove {
			line, err = removeManaged(path, true)
		} else {
			line, err = writeManaged(path, hostsToml(e.server, mirror), true)
		}
		if line != "" {
			report = append(report, "containerd: "+line)
		}
		if err != nil {
			return report, err
		}
	}
	return append(report, "containerd: reads hosts.toml on every pull, no restart needed (its CRI registry config_path must be "+o.ContainerdDir+")"), nil
}

// crio writes one drop-in that makes the agent a mirror of the default
// registry (CRI-O, podman and skopeo send no ns, so the agent serves them
// from its default registry only).
func crio(o Config, mirror *url.URL, def upstream.Registry) ([]string, error) {
	if o.CRIODir == "" {
		return nil, errors.New("--crio-config-path is empty")
	}
	path := filepath.Join(o.CRIODir, DropInName)
	var line string
	var err error
	if o.Remove {
		line, err = removeManaged(path, false)
	} else {
		var b bytes.Buffer
		b.WriteString(Marker + "\n")
		fmt.Fprintf(&b, "[[registry]]\nprefix = %q\nlocation = %q\n", def.Host, def.Host)
		if def.Endpoint.Scheme == "http" {
			b.WriteString("insecure = true\n")
		}
		fmt.Fprintf(&b, "\n[[registry.mirror]]\nlocation = %q\n", mirror.Host)
		if mirror.Scheme == "http" {
			b.WriteString("insecure = true\n")
		}
		line, err = writeManaged(path, b.Bytes(), false)
	}
	report := []string{"crio: " + line}
	if err != nil {
		return report, err
	}
	return append(report, "crio: CRI-O needs a reload to read it (systemctl reload crio); podman and skopeo read it on every run"), nil
}

// docker merges the mirror into daemon.json's registry-mirrors, keeping
// every other key. Docker uses mirrors for Docker Hub only.
func docker(o Config, mirror *url.URL, def upstream.Registry) ([]string, error) {
	if def.Host != "docker.io" {
		return []string{fmt.Sprintf("docker: skipped: Docker uses registry mirrors for Docker Hub only, and the agent's default registry is %s", def.Host)}, nil
	}
	if o.DockerConfig == "" {
		return nil, errors.New("--docker-config is empty")
	}
	raw, err := os.ReadFile(o.DockerConfig)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", o.DockerConfig, err)
	}
	doc := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &doc); err != nil {
			return nil, fmt.Errorf("parse %s: %w", o.DockerConfig, err)
		}
	}
	var mirrors []string
	if m, ok := doc["registry-mirrors"]; ok {
		if err := json.Unmarshal(m, &mirrors); err != nil {
			return nil, fmt.Errorf("parse %s: registry-mirrors: %w", o.DockerConfig, err)
		}
	}
	url := mirror.Scheme + "://" + mirror.Host
	has := slices.Contains(mirrors, url)
	switch {
	case o.Remove && !has, !o.Remove && has:
		return []string{"docker: " + o.DockerConfig + " unchanged"}, nil
	case o.Remove:
		mirrors = slices.DeleteFunc(mirrors, func(m string) bool { return m == url })
	default:
		mirrors = append([]string{url}, mirrors...)
	}
	if len(mirrors) == 0 {
		delete(doc, "registry-mirrors")
	} else {
		doc["registry-mirrors"], _ = json.Marshal(mirrors) // []string always marshals
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", o.DockerConfig, err)
	}
	if err := writeFile(o.DockerConfig, append(out, '\n')); err != nil {
		return nil, err
	}
	verb := "added " + url + " to"
	if o.Remove {
		verb = "removed " + url + " from"
	}
	return []string{
		"docker: " + verb + " registry-mirrors in " + o.DockerConfig + " (other keys kept)",
		"docker: dockerd needs a reload to use it (systemctl reload docker, or SIGHUP)",
	}, nil
}

// writeManaged writes content to path unless it is already there. An
// existing file that is not ours is renamed to path+BackupSuffix when
// backup is set, and is an error otherwise.
func writeManaged(path string, content []byte, backup bool) (string, error) {
	old, err := os.ReadFile(path)
	switch {
	case err == nil && bytes.Equal(old, content):
		return path + " unchanged", nil
	case err == nil && !bytes.HasPrefix(old, []byte(Marker)):
		if !backup {
			return "", fmt.Errorf("%s exists and was not written by starling configure; move it away first", path)
		}
		if _, err := os.Stat(path + BackupSuffix); err == nil {
			return "", fmt.Errorf("%s is not ours and %s already exists; resolve by hand", path, path+BackupSuffix)
		}
		if err := os.Rename(path, path+BackupSuffix); err != nil {
			return "", fmt.Errorf("keep %s aside: %w", path, err)
		}
		if err := writeFile(path, content); err != nil {
			return "", err
		}
		return "wrote " + path + " (the previous file is kept as " + filepath.Base(path) + BackupSuffix + ")", nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if err := writeFile(path, content); err != nil {
		return "", err
	}
	return "wrote " + path, nil
}

// removeManaged deletes our file at path and puts back the operator's file
// kept aside, if any. A file that is not ours is left alone.
func removeManaged(path string, restore bool) (string, error) {
	old, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return path + " absent", nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if !bytes.HasPrefix(old, []byte(Marker)) {
		return path + " left alone (not written by starling configure)", nil
	}
	if err := os.Remove(path); err != nil {
		return "", fmt.Errorf("remove %s: %w", path, err)
	}
	if restore {
		if _, err := os.Stat(path + BackupSuffix); err == nil {
			if err := os.Rename(path+BackupSuffix, path); err != nil {
				return "", fmt.Errorf("restore %s: %w", path, err)
			}
			return "removed " + path + " and restored the previous file", nil
		}
		_ = os.Remove(filepath.Dir(path)) // only if now empty
	}
	return "removed " + path, nil
}

// writeFile replaces path atomically (a runtime reading it concurrently
// sees the old file or the new one), keeping an existing file's mode.
func writeFile(path string, content []byte) error {
	mode := fs.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode().Perm()
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(content); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
