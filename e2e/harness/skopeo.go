package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// SkopeoTimeout bounds one skopeo command.
const SkopeoTimeout = 5 * time.Minute

// insecureAcceptAnything is a containers-policy.json(5) that accepts any
// image, so the host's /etc/containers/policy.json does not matter.
const insecureAcceptAnything = `{"default":[{"type":"insecureAcceptAnything"}]}`

// SkopeoCopy runs
//
//	skopeo --registries-conf REGISTRIESCONF --policy P --registries.d D --tmpdir T \
//	  --override-os linux --override-arch GOARCH \
//	  copy --src-tls-verify=false EXTRA... SRC DST
//
// in a hermetic environment: HOME, XDG dirs and TMPDIR point into a temp
// dir, the trust policy accepts anything, and the blob-info cache lives in
// the temp HOME instead of root's /var/lib/containers/cache. An empty
// registriesConf means an empty registries.conf (never the host's).
// src is typically docker://HOST/REPO:TAG and dst dir:PATH or oci:PATH.
// extraArgs are copy flags, e.g. --src-creds user:pass. The error includes
// skopeo's output.
//
// Note: skopeo still reads drop-ins from /etc/containers/registries.conf.d
// (this version has no way to turn that off); Debian ships only short-name
// aliases there.
func SkopeoCopy(t testing.TB, src, dst, registriesConf string, extraArgs ...string) error {
	t.Helper()
	return skopeoCopy(t, src, dst, registriesConf, "", extraArgs...)
}

// SkopeoCopyWithDropIn is SkopeoCopy with an empty registries.conf and the
// file dropIn copied into the hermetic user's
// ~/.config/containers/registries.conf.d, where containers/image reads
// drop-ins as it does from /etc/containers/registries.conf.d.
func SkopeoCopyWithDropIn(t testing.TB, src, dst, dropIn string, extraArgs ...string) error {
	t.Helper()
	return skopeoCopy(t, src, dst, "", dropIn, extraArgs...)
}

func skopeoCopy(t testing.TB, src, dst, registriesConf, dropIn string, extraArgs ...string) error {
	t.Helper()
	RequireTool(t, "skopeo")
	home := t.TempDir()
	dirs := map[string]string{
		"tmp":         filepath.Join(home, "tmp"),
		"run":         filepath.Join(home, "run"),
		"registriesd": filepath.Join(home, "registries.d"),
		"userconfd":   filepath.Join(home, ".config", "containers", "registries.conf.d"),
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("skopeo copy: %w", err)
		}
	}
	if dropIn != "" {
		b, err := os.ReadFile(dropIn)
		if err != nil {
			return fmt.Errorf("skopeo copy: read drop-in: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dirs["userconfd"], filepath.Base(dropIn)), b, 0o600); err != nil {
			return fmt.Errorf("skopeo copy: write drop-in: %w", err)
		}
	}
	policy := filepath.Join(home, "policy.json")
	if err := os.WriteFile(policy, []byte(insecureAcceptAnything), 0o600); err != nil {
		return fmt.Errorf("skopeo copy: write policy: %w", err)
	}
	if registriesConf == "" {
		registriesConf = filepath.Join(home, "registries.conf")
		if err := os.WriteFile(registriesConf, nil, 0o600); err != nil {
			return fmt.Errorf("skopeo copy: write empty registries.conf: %w", err)
		}
	}

	args := []string{
		"--registries-conf", registriesConf,
		"--policy", policy,
		"--registries.d", dirs["registriesd"],
		"--tmpdir", dirs["tmp"],
		// Random images are single-platform; overriding keeps the choice
		// deterministic for image indexes too.
		"--override-os", "linux",
		"--override-arch", runtime.GOARCH,
		"copy", "--src-tls-verify=false",
	}
	args = append(args, extraArgs...)
	args = append(args, src, dst)

	ctx, cancel := context.WithTimeout(t.Context(), SkopeoTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "skopeo", args...)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + home,
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"XDG_DATA_HOME=" + filepath.Join(home, ".local", "share"),
		"XDG_RUNTIME_DIR=" + dirs["run"],
		"TMPDIR=" + dirs["tmp"],
		// containers/image keeps root's blob-info cache in
		// /var/lib/containers/cache, shared by every test and every run.
		// Claiming a non-root UID moves it under XDG_DATA_HOME. Only the
		// cache location and defaults for containers-storage (unused
		// here) look at this variable.
		"_CONTAINERS_ROOTLESS_UID=65534",
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("skopeo %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// WriteRegistriesConf writes a containers-registries.conf(5) v2 file at path
// that marks registryHost insecure (plain HTTP) and, if mirrorHost is not
// empty, adds it as an insecure mirror of registryHost. Unlike containerd,
// containers/image sends mirror requests with no ?ns= parameter, so the
// mirror must know its default upstream.
func WriteRegistriesConf(path, registryHost, mirrorHost string) error {
	var b strings.Builder
	b.WriteString("unqualified-search-registries = []\n\n")
	b.WriteString("[[registry]]\n")
	fmt.Fprintf(&b, "location = %q\n", registryHost)
	b.WriteString("insecure = true\n")
	if mirrorHost != "" {
		mirrorHost = strings.TrimPrefix(strings.TrimPrefix(mirrorHost, "http://"), "https://")
		b.WriteString("\n[[registry.mirror]]\n")
		fmt.Fprintf(&b, "location = %q\n", mirrorHost)
		b.WriteString("insecure = true\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write registries.conf: %w", err)
	}
	return nil
}
