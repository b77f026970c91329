package manifests

import (
	"testing"

	"go.uber.org/goleak"
)

// No upstream exchange outlives the test that started it: shared fetches
// run detached from their askers, but never unbounded.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
