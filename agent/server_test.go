package agent_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

// serveAgent runs an agent's mirror as Run does (not behind httptest) and
// returns its address.
func serveAgent(t *testing.T, registries ...string) string {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Registries = config.Strings{Values: registries}
	a, err := agent.New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		a.Close()
	})
	return ln.Addr().String()
}

// raw sends one raw request and parses the answer.
func raw(t *testing.T, addr, request string) (*http.Response, map[string]any) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(request)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("read answer to %.60q: %v", request, err)
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp, body
}

// Every error a client can get from the mirror is distribution-spec JSON,
// including the ones net/http and http.ServeMux used to send themselves
// (a redirect for an uncleaned path, a plain-text 404, 400, 431, 501), and
// a 502 names no address or dial error.
func TestEveryErrorIsOCIJSON(t *testing.T) {
	up := testregistry.New(t)
	addr := serveAgent(t, up.URL())
	digest := "sha256:" + strings.Repeat("a", 64)
	for _, c := range []struct {
		name, request string
		status        int
	}{
		{"unknown path", "GET /nothing HTTP/1.1\r\nHost: m\r\n\r\n", 404},
		{"uncleaned path", "GET /v2//app/blobs/" + digest + " HTTP/1.1\r\nHost: m\r\n\r\n", 400},
		{"dot segments", "GET /v2/../app/blobs/" + digest + " HTTP/1.1\r\nHost: m\r\n\r\n", 400},
		{"write method", "DELETE /v2/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n\r\n", 405},
		{"oversized headers", "GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: " + strings.Repeat("x", 2<<20) + "\r\n\r\n", 431},
		{"malformed request", "GET /v2/ HTTP/1.1\r\nHost: m\r\nBad Header\r\n\r\n", 400},
		{"unknown transfer encoding", "POST /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
	} {
		resp, body := raw(t, addr, c.request)
		errs, _ := body["errors"].([]any)
		if resp.StatusCode != c.status || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") || len(errs) == 0 {
			t.Errorf("%s: %d %q %v, want %d with an OCI JSON body", c.name, resp.StatusCode, resp.Header.Get("Content-Type"), body, c.status)
		}
	}
	if resp, _ := raw(t, addr, "GET /v2 HTTP/1.1\r\nHost: m\r\n\r\n"); resp.StatusCode != 200 {
		t.Errorf("GET /v2: %d, want 200 (no redirect)", resp.StatusCode)
	}

	// An unreachable upstream: a short reason, no address, no dial error.
	dead := serveAgent(t, "http://127.0.0.1:1")
	resp, body := raw(t, dead, "GET /v2/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n\r\n")
	msg, _ := json.Marshal(body)
	if resp.StatusCode != http.StatusBadGateway || strings.Contains(string(msg), "127.0.0.1") || strings.Contains(string(msg), "dial") {
		t.Errorf("unreachable upstream: %d %s, want 502 with a short reason", resp.StatusCode, msg)
	}
}
