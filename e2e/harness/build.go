package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// BuildTimeout bounds `go build ./cmd/starling`.
const BuildTimeout = 10 * time.Minute

// StampedVersion and StampedCommit are what BuildStarling stamps into the
// binary with the same -ldflags -X flags as the release build.
const (
	StampedVersion = "v0.0.0-e2e"
	StampedCommit  = "e2e0c0ffee"
)

// EnvStarlingBin names an environment variable that, when set, is the path
// of a prebuilt starling binary for BuildStarling to return instead of
// building one (CI can build once and share it across packages).
const EnvStarlingBin = "STARLING_E2E_BIN"

// starlingBuild is package-level on purpose: building and linking the
// starling binary takes many seconds, and every test in a test binary wants
// the same one, so it is built once per test-binary run. The state is
// write-once (guarded by the sync.Once) and holds no per-test data, so tests
// cannot leak state into each other through it. Main removes the build
// directory when the tests are done.
var starlingBuild struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// BuildStarling builds ./cmd/starling (once per test binary) and returns the
// path of the binary. It is built with -race when the tests are. If
// STARLING_E2E_BIN is set, that binary is used instead.
func BuildStarling(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(EnvStarlingBin); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", EnvStarlingBin, err)
		}
		return p
	}
	RequireTool(t, "go")
	starlingBuild.once.Do(func() {
		starlingBuild.path, starlingBuild.err = buildStarling(t)
	})
	if starlingBuild.err != nil {
		t.Fatalf("build starling: %v", starlingBuild.err)
	}
	return starlingBuild.path
}

func buildStarling(t testing.TB) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	// Not t.TempDir: the binary outlives the test that happened to build it.
	dir, err := os.MkdirTemp("", "starling-e2e-bin-")
	if err != nil {
		return "", fmt.Errorf("create build dir: %w", err)
	}
	starlingBuild.dir = dir
	bin := filepath.Join(dir, "starling")
	const v = "github.com/starling-oci/starling/pkg/version"
	args := []string{"build", "-o", bin, "-ldflags", "-X " + v + ".version=" + StampedVersion + " -X " + v + ".commit=" + StampedCommit}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/starling")

	// Not t.Context: it is cancelled when the building test ends, and the
	// build result is shared by all tests.
	ctx, cancel := context.WithTimeout(context.Background(), BuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go %v in %s: %w\n%s", args, root, err, out)
	}
	t.Logf("built %s in %v (race=%v)", bin, time.Since(start).Round(time.Millisecond), raceEnabled)
	return bin, nil
}

// ModuleRoot walks up from the working directory to the directory holding
// go.mod.
func ModuleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		_, err := os.Stat(filepath.Join(dir, "go.mod"))
		if err == nil {
			return dir, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("find module root: %w", err)
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("find module root: no go.mod above %s", wd)
		}
	}
}

// Main runs the tests and then removes what the harness shares between
// tests (the starling build). Use it as the package's TestMain:
//
//	func TestMain(m *testing.M) { harness.Main(m) }
//
// Without it the build directory is left behind in the system temp dir.
func Main(m *testing.M) {
	code := m.Run()
	if starlingBuild.dir != "" {
		if err := os.RemoveAll(starlingBuild.dir); err != nil {
			fmt.Fprintf(os.Stderr, "harness: remove starling build dir: %v\n", err)
		}
	}
	os.Exit(code)
}
