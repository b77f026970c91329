package nodeconfig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/starling-oci/starling/pkg/config"
)

func cfg(t *testing.T, runtimes []string, registries ...string) Config {
	t.Helper()
	dir := t.TempDir()
	c := DefaultConfig()
	c.Registries = config.Strings{Values: registries}
	c.Runtimes = config.Strings{Values: runtimes}
	c.ContainerdDir = filepath.Join(dir, "certs.d")
	c.CRIODir = filepath.Join(dir, "registries.conf.d")
	c.DockerConfig = filepath.Join(dir, "docker", "daemon.json")
	return c
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func apply(t *testing.T, c Config) []string {
	t.Helper()
	report, err := Apply(c)
	if err != nil {
		t.Fatalf("Apply: %v (report %q)", err, report)
	}
	return report
}

func TestContainerdHostsTomlPerRegistryIdempotent(t *testing.T) {
	c := cfg(t, []string{Containerd}, "docker.io", "http://127.0.0.1:5055", "https://harbor.example.com")
	c.ContainerdDefault = true
	report := apply(t, c)
	want := map[string]string{
		"docker.io":          `server = "https://registry-1.docker.io"`,
		"127.0.0.1:5055":     `server = "http://127.0.0.1:5055"`,
		"harbor.example.com": `server = "https://harbor.example.com"`,
	}
	for host, server := range want {
		got := read(t, filepath.Join(c.ContainerdDir, host, "hosts.toml"))
		if !strings.HasPrefix(got, Marker+"\n") || !strings.Contains(got, server+"\n") ||
			!strings.Contains(got, "[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]") {
			t.Errorf("%s/hosts.toml:\n%s\nwant the marker, %s and the mirror as a pull/resolve host", host, got, server)
		}
	}
	def := read(t, filepath.Join(c.ContainerdDir, "_default", "hosts.toml"))
	if strings.Contains(def, "server =") || !strings.Contains(def, `[host."http://127.0.0.1:5000"]`) {
		t.Errorf("_default/hosts.toml:\n%s\nwant the mirror and no server", def)
	}
	if last := report[len(report)-1]; !strings.Contains(last, "no restart needed") {
		t.Errorf("report does not say whether a restart is needed: %q", report)
	}
	again := apply(t, c)
	for _, line := range again[:len(again)-1] {
		if !strings.HasSuffix(line, " unchanged") {
			t.Errorf("second run changed something: %q", line)
		}
	}
}

func TestContainerdKeepsExistingFileAsideAndRestoresIt(t *testing.T) {
	c := cfg(t, []string{Containerd}, "harbor.example.com")
	path := filepath.Join(c.ContainerdDir, "harbor.example.com", "hosts.toml")
	mine := "server = \"https://harbor.example.com\"\n\n[host.\"https://harbor.example.com\"]\n  ca = \"/etc/ssl/harbor.pem\"\n"
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(mine), 0o600); err != nil {
		t.Fatal(err)
	}
	report := apply(t, c)
	if !strings.Contains(strings.Join(report, "\n"), "kept as hosts.toml"+BackupSuffix) {
		t.Errorf("report does not say the old file was kept: %q", report)
	}
	if got := read(t, path+BackupSuffix); got != mine {
		t.Errorf("backup = %q, want the operator's file", got)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o644 {
		t.Errorf("new hosts.toml mode %v", st.Mode())
	}
	apply(t, c) // a second run must not back up our own file over theirs
	if got := read(t, path+BackupSuffix); got != mine {
		t.Errorf("after a second run the backup = %q", got)
	}

	c.Remove = true
	apply(t, c)
	if got := read(t, path); got != mine {
		t.Errorf("after --remove hosts.toml = %q, want the operator's file back", got)
	}
	if _, err := os.Stat(path + BackupSuffix); !os.IsNotExist(err) {
		t.Errorf("backup still there after --remove: %v", err)
	}
	apply(t, c) // removing twice is harmless and leaves their file
	if got := read(t, path); got != mine {
		t.Errorf("a second --remove touched the operator's file: %q", got)
	}
}

func TestContainerdRemoveDeletesOurFilesOnly(t *testing.T) {
	c := cfg(t, []string{Containerd}, "docker.io")
	apply(t, c)
	c.Remove = true
	apply(t, c)
	if _, err := os.Stat(filepath.Join(c.ContainerdDir, "docker.io")); !os.IsNotExist(err) {
		t.Errorf("docker.io directory left behind: %v", err)
	}
}

func TestCRIODropInForDefaultRegistry(t *testing.T) {
	c := cfg(t, []string{CRIO}, "http://127.0.0.1:5055", "docker.io")
	report := apply(t, c)
	got := read(t, filepath.Join(c.CRIODir, DropInName))
	want := Marker + "\n[[registry]]\nprefix = \"127.0.0.1:5055\"\nlocation = \"127.0.0.1:5055\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n"
	if got != want {
		t.Errorf("drop-in:\n%s\nwant:\n%s", got, want)
	}
	if !strings.Contains(strings.Join(report, "\n"), "reload") {
		t.Errorf("report does not say CRI-O needs a reload: %q", report)
	}
	// Someone else's file of the same name is never overwritten.
	c2 := cfg(t, []string{CRIO}, "docker.io")
	os.MkdirAll(c2.CRIODir, 0o755)
	os.WriteFile(filepath.Join(c2.CRIODir, DropInName), []byte("[[registry]]\n"), 0o644)
	if _, err := Apply(c2); err == nil {
		t.Error("an operator's drop-in of the same name was overwritten")
	}
	c.Remove = true
	apply(t, c)
	if _, err := os.Stat(filepath.Join(c.CRIODir, DropInName)); !os.IsNotExist(err) {
		t.Errorf("drop-in still there after --remove: %v", err)
	}
}

func TestDockerDaemonJSONMergeKeepsOtherKeys(t *testing.T) {
	c := cfg(t, []string{Docker}, "docker.io")
	os.MkdirAll(filepath.Dir(c.DockerConfig), 0o755)
	orig := `{"log-driver":"journald","registry-mirrors":["https://mirror.gcr.io"],"features":{"buildkit":true}}`
	if err := os.WriteFile(c.DockerConfig, []byte(orig), 0o600); err != nil {
		t.Fatal(err)
	}
	apply(t, c)
	var doc map[string]any
	if err := json.Unmarshal([]byte(read(t, c.DockerConfig)), &doc); err != nil {
		t.Fatal(err)
	}
	if doc["log-driver"] != "journald" || !reflect.DeepEqual(doc["features"], map[string]any{"buildkit": true}) {
		t.Errorf("other keys lost: %v", doc)
	}
	if !reflect.DeepEqual(doc["registry-mirrors"], []any{"http://127.0.0.1:5000", "https://mirror.gcr.io"}) {
		t.Errorf("registry-mirrors = %v, want the agent first, the operator's kept", doc["registry-mirrors"])
	}
	if st, _ := os.Stat(c.DockerConfig); st.Mode().Perm() != 0o600 {
		t.Errorf("daemon.json mode changed to %v", st.Mode())
	}
	if r := apply(t, c); !strings.HasSuffix(r[0], "unchanged") {
		t.Errorf("second run: %q, want unchanged", r)
	}
	c.Remove = true
	apply(t, c)
	doc = nil
	json.Unmarshal([]byte(read(t, c.DockerConfig)), &doc)
	if !reflect.DeepEqual(doc["registry-mirrors"], []any{"https://mirror.gcr.io"}) || doc["log-driver"] != "journald" {
		t.Errorf("after --remove: %v, want the operator's mirror and keys only", doc)
	}

	// Docker mirrors only Docker Hub: with another default registry,
	// daemon.json is not touched.
	c3 := cfg(t, []string{Docker}, "harbor.example.com")
	if r := apply(t, c3); !strings.Contains(r[0], "skipped") {
		t.Errorf("non-Docker-Hub default: %q, want skipped", r)
	}
	if _, err := os.Stat(c3.DockerConfig); !os.IsNotExist(err) {
		t.Errorf("daemon.json written for a non-Docker-Hub default: %v", err)
	}
}

func TestBadInput(t *testing.T) {
	for name, c := range map[string]Config{
		"no registry": func() Config { c := cfg(t, []string{Containerd}); return c }(),
		"bad mirror":  func() Config { c := cfg(t, []string{Containerd}, "docker.io"); c.Mirror = "127.0.0.1:5000"; return c }(),
		"bad runtime": cfg(t, []string{"rkt"}, "docker.io"),
	} {
		if _, err := Apply(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
