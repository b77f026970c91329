package harness

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// debianPackages maps the binaries the harness runs to the Debian package
// that provides them.
var debianPackages = map[string]string{
	"containerd":      "containerd",
	"ctr":             "containerd",
	"docker-registry": "docker-registry",
	"skopeo":          "skopeo",
	"go":              "golang-go",
}

// InCI reports whether the tests run in CI (env CI set to a true value, as
// GitHub Actions and most CI systems do). In CI, missing prerequisites fail
// the test instead of skipping it, so that a broken CI image cannot turn the
// end-to-end suite into a silent no-op.
func InCI() bool {
	v, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && v
}

// RequireTool checks that every named binary is on PATH. If one is missing it
// fails the test under CI=true and skips it otherwise, naming the Debian
// package to install.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	var missing, pkgs []string
	for _, n := range names {
		if _, err := exec.LookPath(n); err == nil {
			continue
		}
		missing = append(missing, n)
		pkg, ok := debianPackages[n]
		if !ok {
			pkg = n
		}
		pkgs = append(pkgs, pkg)
	}
	if len(missing) == 0 {
		return
	}
	skipOrFail(t, "missing %s on PATH: install it with `apt-get install %s`",
		strings.Join(missing, ", "), strings.Join(dedup(pkgs), " "))
}

// RequireRoot skips (or, under CI, fails) the test unless it runs as root.
// containerd needs root for its snapshotters and for chown while unpacking.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "this test runs containerd and must run as root (uid %d)", os.Geteuid())
	}
}

func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

func dedup(s []string) []string {
	seen := make(map[string]bool, len(s))
	out := s[:0:0]
	for _, v := range s {
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}
