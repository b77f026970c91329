package manifests_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Agents, supernodes and their libp2p hosts leave nothing running.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
