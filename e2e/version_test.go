package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestVersionStampedAndEnvConfig checks the linker stamping that the
// Makefile and Dockerfile use (`starling version`, `--version`, the
// startup log line) and that a daemon configured only through STARLING_*
// environment variables (as the Helm chart may do) starts with them.
func TestVersionStampedAndEnvConfig(t *testing.T) {
	t.Parallel()
	bin := harness.BuildStarling(t)
	want := "starling " + harness.StampedVersion + " (commit " + harness.StampedCommit + ", " + runtime.Version() + ")"
	for _, arg := range []string{"version", "--version"} {
		out, err := exec.Command(bin, arg).CombinedOutput()
		if err != nil {
			t.Fatalf("starling %s: %v\n%s", arg, err, out)
		}
		if got := strings.TrimSpace(string(out)); got != want {
			t.Errorf("starling %s printed %q, want %q", arg, got, want)
		}
	}

	dir := t.TempDir()
	addrFile := filepath.Join(dir, "addrs.json")
	cmd := exec.Command(bin, "agent")
	cmd.Env = append(os.Environ(),
		"STARLING_LISTEN=127.0.0.1:0",
		"STARLING_REGISTRY=http://127.0.0.1:9,http://127.0.0.2:9",
		"STARLING_DATA_DIR="+filepath.Join(dir, "data"),
		"STARLING_ADDR_FILE="+addrFile,
		"STARLING_CACHE_SIZE=1Gi",
	)
	proc := harness.StartCommand(t, "agent-env", cmd)
	harness.WaitForFile(t, addrFile, harness.StartTimeout)
	proc.Stop()
	logs, err := proc.Log()
	if err != nil {
		t.Fatal(err)
	}
	var sawStart, sawRegistries bool
	sc := bufio.NewScanner(bytes.NewReader(logs))
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			continue
		}
		if line["msg"] == "starting starling agent" {
			sawStart = line["version"] == harness.StampedVersion && line["commit"] == harness.StampedCommit && line["go"] == runtime.Version()
		}
		if regs, ok := line["registries"].([]any); ok && len(regs) == 2 {
			sawRegistries = true
		}
	}
	if !sawStart {
		t.Errorf("no startup line carrying version %s and commit %s:\n%s", harness.StampedVersion, harness.StampedCommit, logs)
	}
	if !sawRegistries {
		t.Errorf("STARLING_REGISTRY's two registries not in the listening line:\n%s", logs)
	}
}
