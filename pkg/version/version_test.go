package version

import (
	"runtime"
	"runtime/debug"
	"testing"
)

func TestResolveFallsBackToBuildInfo(t *testing.T) {
	bi := func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}, Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc123"}}}, true
	}
	if got := resolve("", "", bi); got.Version != "v1.2.3" || got.Commit != "abc123" || got.GoVersion != runtime.Version() {
		t.Errorf("from build info: %+v", got)
	}
	if got := resolve("v9", "def", bi); got.Version != "v9" || got.Commit != "def" {
		t.Errorf("stamped values must win: %+v", got)
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	if got := resolve("", "", none); got.Version != "dev" || got.Commit != "unknown" {
		t.Errorf("unstamped: %+v", got)
	}
}
