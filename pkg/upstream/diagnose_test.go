package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestCause(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Net: "tcp", Err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}, "connection refused"},
		{&net.OpError{Op: "read", Net: "tcp", Err: &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}}, "connection reset"},
		{&net.DNSError{Err: "no such host", Name: "registry.invalid", IsNotFound: true}, "DNS lookup failed"},
		{fmt.Errorf("GET x: %w", context.DeadlineExceeded), "timed out"},
		{errors.New("something else entirely"), "connection failed"},
	} {
		if got := Cause(tt.err); got != tt.want {
			t.Errorf("Cause(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

// observed returns a client whose log is recorded.
func observed(t *testing.T) (*Client, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	c, err := NewClient(Options{}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	return c, logs
}

func warnsWith(logs *observer.ObservedLogs, cause string) bool {
	for _, e := range logs.FilterLevelExact(zapcore.WarnLevel).All() {
		if e.ContextMap()["cause"] == cause {
			return true
		}
	}
	return false
}

// TestPlainHTTPRegistryNamedWithoutScheme: --registry host:port means
// HTTPS; against a plain-HTTP registry the failure says so, in the error and
// in a warning.
func TestPlainHTTPRegistryNamedWithoutScheme(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	reg, err := ParseRegistry(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	c, logs := observed(t)
	// With the client's own credentials the request goes out as configured
	// (anonymous requests take go-containerregistry's token flow, whose ping
	// may try plain HTTP on loopback by itself).
	_, err = c.Do(t.Context(), Request{Registry: reg, Repo: "app", Method: http.MethodGet, Path: "manifests/v1", Authorization: "Basic dTpw"})
	const want = "server gave HTTP response to HTTPS client"
	if !errors.Is(err, ErrUnreachable) || Cause(err) != want {
		t.Fatalf("Do = %v (cause %q), want unreachable with cause %q", err, Cause(err), want)
	}
	if !warnsWith(logs, want) {
		t.Fatalf("no warning with cause %q; logs: %v", want, logs.All())
	}

	f := c.Check(t.Context(), reg)
	if f.Reachable || f.Cause != want || !strings.Contains(f.Hint, "http://") {
		t.Fatalf("Check = %+v, want unreachable, cause %q and a hint to use http://", f, want)
	}
}

func TestUntrustedCertificate(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	reg, err := ParseRegistry(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	c, logs := observed(t)
	_, err = c.Do(t.Context(), Request{Registry: reg, Repo: "app", Method: http.MethodGet, Path: "manifests/v1"})
	const want = "TLS certificate not trusted"
	if Cause(err) != want || !warnsWith(logs, want) {
		t.Fatalf("Do = %v (cause %q), want cause %q logged at warn", err, Cause(err), want)
	}
}

func TestServerErrorIsLoggedAtWarn(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	reg, err := ParseRegistry(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	c, logs := observed(t)
	if _, err := c.Do(t.Context(), Request{Registry: reg, Repo: "app", Method: http.MethodGet, Path: "manifests/v1"}); !IsUnavailable(err) {
		t.Fatalf("Do = %v, want unavailable", err)
	}
	if !warnsWith(logs, "HTTP 503") {
		t.Fatalf("no warning with cause HTTP 503; logs: %v", logs.All())
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	open := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/" {
			http.NotFound(w, r)
		}
	}))
	defer open.Close()
	private := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="https://auth.example/token",service="registry"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer private.Close()
	tlsSrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer tlsSrv.Close()

	c, _ := observed(t)
	for _, tt := range []struct {
		url  string
		want Finding
	}{
		{open.URL, Finding{Reachable: true, TLS: false, Status: 200}},
		{private.URL, Finding{Reachable: true, TLS: false, Status: 401, AuthRequired: true}},
		{strings.Replace(tlsSrv.URL, "https://", "http://", 1), Finding{Reachable: true, Status: 400}},
	} {
		reg, err := ParseRegistry(tt.url)
		if err != nil {
			t.Fatal(err)
		}
		got := c.Check(t.Context(), reg)
		if got.Reachable != tt.want.Reachable || got.TLS != tt.want.TLS || got.Status != tt.want.Status || got.AuthRequired != tt.want.AuthRequired {
			t.Errorf("Check(%s) = %+v, want %+v", tt.url, got, tt.want)
		}
		if tt.want.Status == 400 && !strings.Contains(got.Hint, "https://") {
			t.Errorf("Check(%s): hint %q does not suggest https://", tt.url, got.Hint)
		}
	}
}
