// Package e2e holds Starling's end-to-end tests: the real starling binary
// against a real registry, containerd and skopeo, started by e2e/harness.
package e2e

import (
	"testing"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestMain removes the shared starling build when the tests are done.
func TestMain(m *testing.M) { harness.Main(m) }
