package docs_test

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/supernode"
)

// TestDockerfile keeps deploy/Dockerfile true to the code: it builds with
// the Go version go.mod names, stamps the version, is multi-arch, and
// exposes every port the daemons listen on by default.
func TestDockerfile(t *testing.T) {
	df, err := os.ReadFile(filepath.Join("..", "deploy", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	mod, err := os.ReadFile(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	text := string(df)
	if !strings.Contains(text, "ARG GO_VERSION="+string(goLine[1])+"\n") {
		t.Errorf("deploy/Dockerfile does not build with go %s (go.mod's)", goLine[1])
	}
	for _, want := range []string{"TARGETOS", "TARGETARCH", "--platform=$BUILDPLATFORM", "pkg/version.version=${VERSION}",
		"pkg/version.commit=${COMMIT}", "org.opencontainers.image.version", "org.opencontainers.image.revision", "org.opencontainers.image.source"} {
		if !strings.Contains(text, want) {
			t.Errorf("deploy/Dockerfile lacks %s", want)
		}
	}
	expose := regexp.MustCompile(`(?m)^EXPOSE (.+)$`).FindStringSubmatch(text)
	if expose == nil {
		t.Fatal("deploy/Dockerfile exposes no port")
	}
	exposed := map[string]bool{}
	for _, p := range strings.Fields(expose[1]) {
		exposed[p] = true
	}
	ac, sc := agent.DefaultConfig(), supernode.DefaultConfig()
	ports := map[string]string{"agent --listen": ac.Listen, "agent --metrics-listen": ac.MetricsListen, "supernode --metrics-listen": sc.MetricsListen}
	for name, addr := range ports {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("%s %q: %v", name, addr, err)
		}
		if !exposed[port] {
			t.Errorf("deploy/Dockerfile does not expose %s (%s)", port, name)
		}
	}
	for name, ma := range map[string]string{"agent --p2p-listen": ac.P2PListen.Values[0], "supernode --p2p-listen": sc.P2PListen.Values[0]} {
		port := ma[strings.LastIndex(ma, "/")+1:]
		if !exposed[port] {
			t.Errorf("deploy/Dockerfile does not expose %s (%s)", port, name)
		}
	}
	if !exposed["4080"] {
		t.Error("deploy/Dockerfile does not expose 4080 (the chart's supernode --http-listen)")
	}
}
