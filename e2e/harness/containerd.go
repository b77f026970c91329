package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	// ContainerdNamespace is the containerd namespace the harness's ctr
	// commands use.
	ContainerdNamespace = "starling-e2e"
	// ContainerdSnapshotter is the snapshotter Pull unpacks into unless the
	// caller passes --snapshotter. native (plain directory copies) works
	// wherever containerd runs, including nested containers where overlayfs
	// cannot be mounted; the tests care about fetching, not about mounts.
	ContainerdSnapshotter = "native"
	// CtrTimeout bounds one ctr command.
	CtrTimeout = 5 * time.Minute
)

// Containerd is a private containerd daemon: its own root, state, socket
// and config in a temp dir, CRI disabled.
type Containerd struct {
	proc *Process
	dir  string
	sock string
}

// StartContainerd starts a private containerd and waits until it answers
// `ctr version`. It is stopped and its directory removed when the test ends.
func StartContainerd(t testing.TB) *Containerd {
	t.Helper()
	RequireTool(t, "containerd", "ctr")
	RequireRoot(t)
	// Not t.TempDir: unix socket paths must stay under 108 bytes, and
	// t.TempDir paths embed the (possibly long) test name.
	dir, err := os.MkdirTemp("/tmp", "ctd")
	if err != nil {
		t.Fatalf("create containerd dir: %v", err)
	}
	// Registered before the process cleanup, so it runs after the daemon
	// has stopped.
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove containerd dir: %v", err)
		}
	})
	c := &Containerd{dir: dir, sock: filepath.Join(dir, "c.sock")}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(containerdConfig(dir, c.sock)), 0o600); err != nil {
		t.Fatalf("write containerd config: %v", err)
	}
	c.proc = StartProcess(t, "containerd", "containerd", "--config", cfgPath, "--log-level", "info")

	var lastErr error
	err = poll(StartTimeout, func() (bool, error) {
		select {
		case <-c.proc.Exited():
			return false, fmt.Errorf("containerd exited: %v", c.proc.Err())
		default:
		}
		if _, err := os.Stat(c.sock); err != nil {
			lastErr = err
			return false, nil
		}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "ctr", "--address", c.sock, "version").CombinedOutput()
		if err != nil {
			lastErr = fmt.Errorf("ctr version: %w: %s", err, out)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		log, _ := c.proc.Log()
		t.Fatalf("waiting for containerd on %s: %v (last error: %v)\nlast lines of its log:\n%s", c.sock, err, lastErr, tail(log, logTailLines))
	}
	t.Logf("containerd ready on %s", c.sock)
	return c
}

// containerdConfig is a minimal containerd 1.6 config: everything under dir,
// and the plugins that need more than a plain sandbox (CRI, and the
// snapshotters for filesystems we do not have) disabled.
func containerdConfig(dir, sock string) string {
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	return `version = 2
root = ` + q(filepath.Join(dir, "root")) + `
state = ` + q(filepath.Join(dir, "state")) + `
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = ` + q(sock) + `

[ttrpc]
  address = ` + q(sock+".ttrpc") + `

[plugins."io.containerd.internal.v1.opt"]
  path = ` + q(filepath.Join(dir, "opt")) + `
`
}

// Address returns the path of containerd's gRPC socket.
func (c *Containerd) Address() string { return c.sock }

// Dir returns the temp dir holding config, root, state and socket.
func (c *Containerd) Dir() string { return c.dir }

// Process returns the daemon process.
func (c *Containerd) Process() *Process { return c.proc }

// Stop stops the daemon (SIGTERM, then SIGKILL) and waits for it.
func (c *Containerd) Stop() { c.proc.Stop() }

// Ctr runs `ctr --address SOCK --namespace starling-e2e ARGS...` and returns
// its combined output. The error includes the output.
func (c *Containerd) Ctr(t testing.TB, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), CtrTimeout)
	defer cancel()
	full := append([]string{"--address", c.sock, "--namespace", ContainerdNamespace}, args...)
	cmd := exec.CommandContext(ctx, "ctr", full...)
	cmd.Env = append(os.Environ(), "CONTAINERD_SNAPSHOTTER="+ContainerdSnapshotter)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Pull runs `ctr images pull --hosts-dir HOSTSDIR EXTRA... REF`: ctr resolves
// and fetches every blob through the hosts configured in HOSTSDIR (see
// WriteHostsToml), containerd's content store verifies each digest, and the
// layers are unpacked into ContainerdSnapshotter unless extraArgs names
// another --snapshotter. The error includes ctr's output.
//
// No --plain-http is needed: hosts.toml gives http:// URLs explicitly.
func (c *Containerd) Pull(t testing.TB, ref, hostsDir string, extraArgs ...string) error {
	t.Helper()
	args := append([]string{"images", "pull", "--hosts-dir", hostsDir}, extraArgs...)
	args = append(args, ref)
	out, err := c.Ctr(t, args...)
	if err != nil {
		return fmt.Errorf("pull %s into containerd: %w", ref, err)
	}
	// On a hosts.toml it cannot parse, ctr logs an error and pulls with
	// default hosts instead: the pull would bypass the mirror unnoticed.
	if strings.Contains(out, "failed to decode hosts.toml") {
		return fmt.Errorf("pull %s into containerd: ctr could not parse the hosts.toml in %s and ignored it:\n%s", ref, hostsDir, out)
	}
	return nil
}

// ContentDigests lists the digests in containerd's content store.
func (c *Containerd) ContentDigests(t testing.TB) ([]string, error) {
	t.Helper()
	out, err := c.Ctr(t, "content", "ls", "-q")
	if err != nil {
		return nil, fmt.Errorf("list containerd content: %w", err)
	}
	return strings.Fields(out), nil
}

// WriteHostsToml writes DIR/<registryHost>/hosts.toml so that ctr
// --hosts-dir DIR pulls registryHost's images through mirrorURL first and
// falls back to the registry itself (http://registryHost). mirrorURL may be a
// host:port (http is assumed) or an http(s) URL; if empty, only the registry
// is configured.
//
// containerd adds ?ns=<registryHost> to every request it sends to the
// mirror, and on any mirror failure it silently retries the next host, i.e.
// the registry: to prove a pull went through the mirror, check the
// registry's access log for the client's user agent.
func WriteHostsToml(dir, registryHost, mirrorURL string) error {
	if registryHost == "" || strings.Contains(registryHost, "/") {
		return fmt.Errorf("write hosts.toml: invalid registry host %q", registryHost)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "server = %q\n", "http://"+registryHost)
	if mirrorURL != "" {
		if !strings.HasPrefix(mirrorURL, "http://") && !strings.HasPrefix(mirrorURL, "https://") {
			mirrorURL = "http://" + mirrorURL
		}
		fmt.Fprintf(&b, "\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirrorURL)
	} else {
		// containerd 1.6 rejects a hosts.toml without a host table
		// ("invalid `host` tree"), logs an error and falls back to its
		// defaults, silently ignoring `server`. An empty table parses.
		b.WriteString("\n[host]\n")
	}
	hostDir := filepath.Join(dir, registryHost)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		return fmt.Errorf("write hosts.toml: %w", err)
	}
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write hosts.toml: %w", err)
	}
	return nil
}
