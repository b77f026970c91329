// Package version reports what build of Starling is running. The release
// build stamps Version and Commit with the linker:
//
//	go build -ldflags "-X github.com/starling-oci/starling/pkg/version.version=v0.3.0 \
//	  -X github.com/starling-oci/starling/pkg/version.commit=$(git rev-parse HEAD)" ./cmd/starling
//
// Without stamping, the module version and VCS revision recorded by the Go
// toolchain are used when present, else "dev" and "unknown".
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set by -ldflags -X at build time; never written at run time.
var (
	version string
	commit  string
)

// Info is one build's identity.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	GoVersion string `json:"go_version"`
}

// Get returns the running binary's build information.
func Get() Info {
	return resolve(version, commit, debug.ReadBuildInfo)
}

func resolve(v, c string, read func() (*debug.BuildInfo, bool)) Info {
	info := Info{Version: v, Commit: c, GoVersion: runtime.Version()}
	if bi, ok := read(); ok {
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && info.Commit == "" {
				info.Commit = s.Value
			}
		}
	}
	if info.Version == "" {
		info.Version = "dev"
	}
	if info.Commit == "" {
		info.Commit = "unknown"
	}
	return info
}

// String is the one-line form `starling version` prints.
func (i Info) String() string {
	return fmt.Sprintf("starling %s (commit %s, %s)", i.Version, i.Commit, i.GoVersion)
}
