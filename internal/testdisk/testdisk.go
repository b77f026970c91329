// Package testdisk gives tests small filesystems of their own, so that a
// full disk can be tested without filling the machine's.
package testdisk

import (
	"fmt"
	"os"
	"syscall"
	"testing"
)

// Tmpfs mounts a tmpfs of size bytes on a fresh directory, unmounted when
// the test ends. It needs CAP_SYS_ADMIN: without it the test is skipped,
// except under CI=true, where CI runs as root and its absence fails the test.
func Tmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0755", size)); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mount a %d-byte tmpfs (CI runs as root): %v", size, err)
		}
		t.Skipf("mount tmpfs: %v (needs root; CI=true makes this a failure)", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}
