package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starling-oci/starling/e2e/harness"
	"github.com/starling-oci/starling/pkg/nodeconfig"
)

// TestConfigureRealRuntimes runs `starling configure` for containerd and
// CRI-O/podman against a real agent, over a certs.d directory that already
// holds the operator's hosts.toml for the registry, and then pulls with a
// private real containerd and with real skopeo using only the files
// configure wrote: every blob must reach the clients through the agent.
// `configure --remove` must then give the operator's file back.
func TestConfigureRealRuntimes(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry", "containerd", "ctr", "skopeo")
	harness.RequireRoot(t)
	bin := harness.BuildStarling(t)

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/configure"
	img, ref := harness.PushRandomImage(t, reg.Addr(), repo, "v1", 2, 256<<10)
	blobs := blobDigests(t, img)
	ag := harness.StartAgent(t, bin, "--registry", reg.URL())

	certsD := filepath.Join(t.TempDir(), "certs.d")
	confD := filepath.Join(t.TempDir(), "registries.conf.d")
	// The operator's own file for the registry: straight to it, no mirror.
	// configure must keep it aside (containerd would otherwise bypass the
	// agent) and --remove must restore it.
	theirs := filepath.Join(certsD, reg.Addr(), "hosts.toml")
	theirContent := "server = \"" + reg.URL() + "\"\n\n[host.\"" + reg.URL() + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	if err := os.MkdirAll(filepath.Dir(theirs), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(theirs, []byte(theirContent), 0o644); err != nil {
		t.Fatal(err)
	}

	configure := func(extra ...string) string {
		t.Helper()
		args := append([]string{"configure", "--runtime", "containerd", "--runtime", "crio",
			"--registry", reg.URL(), "--mirror", ag.MirrorURL(),
			"--containerd-config-path", certsD, "--crio-config-path", confD}, extra...)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("starling %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("starling configure %s:\n%s", strings.Join(extra, " "), out)
		return string(out)
	}
	out := configure()
	for _, want := range []string{"kept as hosts.toml" + nodeconfig.BackupSuffix, "no restart needed", nodeconfig.DropInName, "reload"} {
		if !strings.Contains(out, want) {
			t.Errorf("configure's report lacks %q", want)
		}
	}

	ctd := harness.StartContainerd(t)
	if err := ctd.Pull(t, ref.String(), certsD); err != nil {
		t.Fatal(err)
	}
	assertContainerdContent(t, ctd, img)
	dst := t.TempDir()
	if err := harness.SkopeoCopyWithDropIn(t, "docker://"+ref.String(), "dir:"+dst, filepath.Join(confD, nodeconfig.DropInName)); err != nil {
		t.Fatal(err)
	}
	assertDirBlobs(t, dst, blobs)
	reqs := waitSentinel(t, reg)
	assertBlobGETsOnlyFrom(t, reqs, repo, blobs, agentUserAgent)
	for _, q := range reqs {
		if strings.HasPrefix(q.UserAgent, "skopeo/") || strings.HasPrefix(q.UserAgent, "containerd/") {
			t.Errorf("a client reached the registry directly, not through what configure wrote: %+v", q)
		}
	}

	// Idempotent, then removable.
	if again := configure(); strings.Contains(again, "wrote") {
		t.Errorf("a second configure rewrote files:\n%s", again)
	}
	configure("--remove")
	if b, err := os.ReadFile(theirs); err != nil || string(b) != theirContent {
		t.Errorf("after --remove the operator's hosts.toml = %q, %v; want it restored", b, err)
	}
	if _, err := os.Stat(filepath.Join(confD, nodeconfig.DropInName)); !os.IsNotExist(err) {
		t.Errorf("drop-in still there after --remove: %v", err)
	}
}
