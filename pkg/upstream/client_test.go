package upstream

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"go.uber.org/zap/zaptest"
)

// Requests without client credentials go through go-containerregistry's
// token transport; they still carry our User-Agent (the registry's access
// log tells the supernode's requests from the agents' by it).
func TestAnonymousRequestsKeepOurUserAgent(t *testing.T) {
	var mu sync.Mutex
	var agents []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		agents = append(agents, r.Method+" "+r.URL.Path+" "+r.UserAgent())
		mu.Unlock()
	}))
	defer srv.Close()
	regs, c, err := Open([]string{srv.URL}, Options{UserAgent: "starling-test", Keychain: authn.NewMultiKeychain()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	reg, _ := regs.Lookup("")
	resp, err := c.Do(context.Background(), Request{Registry: reg, Repo: "app", Method: http.MethodHead, Path: "manifests/v1"})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	mu.Lock()
	defer mu.Unlock()
	for _, a := range agents {
		if !strings.Contains(a, " starling-test") {
			t.Errorf("request without our User-Agent: %s", a)
		}
	}
	if len(agents) == 0 {
		t.Fatal("no request reached the registry")
	}
}
