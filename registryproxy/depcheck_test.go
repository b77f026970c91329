package registryproxy

import (
	"os/exec"
	"strings"
	"testing"
)

// The mirror must know nothing of P2P: the swarm plugs in behind
// BlobSource. This keeps it so.
func TestNoP2PDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "libp2p") || strings.Contains(dep, "starling/agent") || strings.Contains(dep, "starling/supernode") {
			t.Errorf("registryproxy depends on %s", dep)
		}
	}
}
