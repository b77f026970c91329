package harness

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// StartTimeout bounds how long the harness waits for a server to come up.
const StartTimeout = 30 * time.Second

// RegistryOptions configures StartRegistry. The zero value is an open
// registry (no auth).
type RegistryOptions struct {
	// Users, if not empty, turns on htpasswd basic auth with these
	// username/password pairs. Every request then needs credentials,
	// including pulls.
	Users map[string]string
	// Realm is the basic-auth realm; default "starling-e2e".
	Realm string
	// NotifyURL, if set, is a notifications endpoint: the registry POSTs
	// its event envelopes (distribution's notification format) there,
	// with NotifyHeaders.
	NotifyURL     string
	NotifyHeaders map[string][]string
}

// Registry is a running distribution registry (docker-registry serve).
type Registry struct {
	t    testing.TB
	proc *Process
	addr string
	dir  string
}

// Request is one HTTP request as the registry logged it.
type Request struct {
	Time       time.Time
	Method     string
	Path       string // request URI as received: path and query
	UserAgent  string
	Status     int
	RemoteAddr string // client ip:port
	Written    int64  // response body bytes written
	Duration   time.Duration
}

// listeningRE matches distribution's startup line, e.g.
// {"level":"info","msg":"listening on 127.0.0.1:35907",...}. The registry
// logs the address of the bound listener (net.Listener.Addr), so with
// http.addr 127.0.0.1:0 it reports the port the kernel chose.
var listeningRE = regexp.MustCompile(`"msg":"listening on (127\.0\.0\.1:[0-9]+)"`)

// StartRegistry runs `docker-registry serve` with a generated config:
// filesystem storage in a temp dir, http.addr 127.0.0.1:0, JSON logs,
// deletes enabled, no auth unless opts.Users is set. It returns once the
// registry has logged its bound address.
func StartRegistry(t testing.TB, opts RegistryOptions) *Registry {
	t.Helper()
	RequireTool(t, "docker-registry")
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yml")
	cfg, err := registryConfig(dir, opts)
	if err != nil {
		t.Fatalf("generate registry config: %v", err)
	}
	if err := os.WriteFile(cfgPath, cfg, 0o600); err != nil {
		t.Fatalf("write registry config: %v", err)
	}
	proc := StartProcess(t, "registry", "docker-registry", "serve", cfgPath)
	m := proc.WaitForLog(t, listeningRE, StartTimeout)
	r := &Registry{t: t, proc: proc, addr: m[1], dir: dir}
	t.Logf("registry listening on %s", r.addr)
	return r
}

func registryConfig(dir string, opts RegistryOptions) ([]byte, error) {
	// JSON is a subset of YAML: building the config as JSON gets the quoting
	// of paths right without a YAML library.
	cfg := map[string]any{
		"version": "0.1",
		"log": map[string]any{
			"level":     "info",
			"formatter": "json",
			// The gorilla combined-format access log duplicates the JSON
			// "response completed" lines on stdout, minus the client port.
			"accesslog": map[string]any{"disabled": true},
		},
		"storage": map[string]any{
			"filesystem": map[string]any{"rootdirectory": filepath.Join(dir, "data")},
			"delete":     map[string]any{"enabled": true},
			// The purger would start a goroutine that walks the storage
			// every few minutes; not wanted in a test.
			"maintenance": map[string]any{"uploadpurging": map[string]any{"enabled": false}},
		},
		"http": map[string]any{
			"addr": "127.0.0.1:0",
			// A fixed secret silences the startup warning about a random one.
			"secret": "starling-e2e-not-a-secret",
		},
	}
	if opts.NotifyURL != "" {
		cfg["notifications"] = map[string]any{"endpoints": []any{map[string]any{
			"name": "starling", "url": opts.NotifyURL, "headers": opts.NotifyHeaders,
			"timeout": "5s", "threshold": 10, "backoff": "100ms",
		}}}
	}
	if len(opts.Users) > 0 {
		htpasswd, err := htpasswdFile(opts.Users)
		if err != nil {
			return nil, err
		}
		path := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(path, htpasswd, 0o600); err != nil {
			return nil, fmt.Errorf("write htpasswd: %w", err)
		}
		realm := opts.Realm
		if realm == "" {
			realm = "starling-e2e"
		}
		cfg["auth"] = map[string]any{"htpasswd": map[string]any{"realm": realm, "path": path}}
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("marshal registry config: %w", err)
	}
	return b, nil
}

// htpasswdFile renders users as an htpasswd file with bcrypt hashes, the
// only hash distribution's htpasswd access controller accepts.
func htpasswdFile(users map[string]string) ([]byte, error) {
	names := make([]string, 0, len(users))
	for u := range users {
		if u == "" || strings.ContainsAny(u, ":\n") {
			return nil, fmt.Errorf("invalid htpasswd user name %q", u)
		}
		names = append(names, u)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	for _, u := range names {
		// MinCost: the registry checks a hash per request; keep it cheap.
		h, err := bcrypt.GenerateFromPassword([]byte(users[u]), bcrypt.MinCost)
		if err != nil {
			return nil, fmt.Errorf("bcrypt password of %s: %w", u, err)
		}
		fmt.Fprintf(&buf, "%s:%s\n", u, h)
	}
	return buf.Bytes(), nil
}

// Addr returns the registry's host:port, e.g. "127.0.0.1:35907". It is also
// the registry host in image references.
func (r *Registry) Addr() string { return r.addr }

// URL returns the base URL, e.g. "http://127.0.0.1:35907".
func (r *Registry) URL() string { return "http://" + r.addr }

// Dir returns the registry's temp dir (config, htpasswd, storage in data/).
func (r *Registry) Dir() string { return r.dir }

// Process returns the underlying process.
func (r *Registry) Process() *Process { return r.proc }

// Stop kills the registry and waits for it to exit. It is idempotent.
func (r *Registry) Stop() { r.proc.Kill() }

// AccessLog parses the registry log into one Request per completed request,
// in log order.
//
// The registry writes a request's line when its handler returns, which can
// be just after the client has read the last byte of the response: a request
// the client has seen complete may be missing from a snapshot taken
// immediately afterwards. Use WaitAccessLog to wait for expected lines.
//
// Requests rejected by auth (logged by distribution without a status, as
// "error authorizing context: ...") are included with Status 401.
func (r *Registry) AccessLog() []Request {
	log, err := r.proc.Log()
	if err != nil {
		r.t.Errorf("registry access log: %v", err)
		return nil
	}
	reqs, err := ParseAccessLog(log)
	if err != nil {
		r.t.Errorf("registry access log: %v", err)
	}
	return reqs
}

// WaitAccessLog polls the access log until cond holds for it, and returns
// that log. It fails the test after timeout.
func (r *Registry) WaitAccessLog(t testing.TB, timeout time.Duration, cond func([]Request) bool) []Request {
	t.Helper()
	var reqs []Request
	err := poll(timeout, func() (bool, error) {
		log, err := r.proc.Log()
		if err != nil {
			return false, err
		}
		reqs, err = ParseAccessLog(log)
		if err != nil {
			return false, err
		}
		return cond(reqs), nil
	})
	if err != nil {
		t.Fatalf("waiting for the registry access log: %v; it has %d requests:\n%s", err, len(reqs), FormatRequests(reqs))
	}
	return reqs
}

// BlobGETs returns the logged GET requests for blobs of repo (any status;
// upload endpoints excluded).
func (r *Registry) BlobGETs(repo string) []Request {
	return FilterRequests(r.AccessLog(), "GET", "/v2/"+repo+"/blobs/")
}

// FilterRequests returns the requests with the given method (any if empty)
// whose path (query stripped) starts with pathPrefix, excluding the blob
// upload endpoints under /blobs/uploads/.
func FilterRequests(reqs []Request, method, pathPrefix string) []Request {
	var out []Request
	for _, q := range reqs {
		p := q.URLPath()
		if method != "" && q.Method != method {
			continue
		}
		if !strings.HasPrefix(p, pathPrefix) || strings.Contains(p, "/blobs/uploads/") {
			continue
		}
		out = append(out, q)
	}
	return out
}

// URLPath returns the path part of the request URI, without the query.
func (q Request) URLPath() string {
	p, _, _ := strings.Cut(q.Path, "?")
	return p
}

// Digest returns the digest a /blobs/<digest> or /manifests/<digest> request
// asked for, or "" if it asked by tag or is another endpoint.
func (q Request) Digest() string {
	p := q.URLPath()
	i := strings.LastIndex(p, "/")
	if i < 0 {
		return ""
	}
	last := p[i+1:]
	rest := p[:i]
	if !strings.HasSuffix(rest, "/blobs") && !strings.HasSuffix(rest, "/manifests") {
		return ""
	}
	if !strings.Contains(last, ":") {
		return ""
	}
	return last
}

// FormatRequests renders requests one per line, for failure messages.
func FormatRequests(reqs []Request) string {
	var b strings.Builder
	for _, q := range reqs {
		fmt.Fprintf(&b, "%s %s -> %d (%d bytes) from %s ua=%q\n", q.Method, q.Path, q.Status, q.Written, q.RemoteAddr, q.UserAgent)
	}
	return b.String()
}

// accessLine is the subset of a distribution JSON log entry that the access
// log needs. distribution logs one entry per completed request, with msg
// "response completed" (2xx/3xx) or "response completed with error"; a
// request that fails authorization gets instead a warning "error authorizing
// context: ..." with the request fields but no response fields.
type accessLine struct {
	Msg        string    `json:"msg"`
	Time       time.Time `json:"time"`
	Method     string    `json:"http.request.method"`
	URI        string    `json:"http.request.uri"`
	UserAgent  string    `json:"http.request.useragent"`
	RemoteAddr string    `json:"http.request.remoteaddr"`
	Status     *int      `json:"http.response.status"`
	Written    int64     `json:"http.response.written"`
	Duration   string    `json:"http.response.duration"`
}

// authRejectedMsg starts the message distribution logs when it refuses a
// request for lack of valid credentials (and answers 401).
const authRejectedMsg = "error authorizing context"

// ParseAccessLog extracts the requests from distribution's JSON log: one per
// completed request, and one with Status 401 per request refused by auth.
// Other lines are skipped.
func ParseAccessLog(log []byte) ([]Request, error) {
	var reqs []Request
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' || !bytes.Contains(line, []byte(`"http.request.method"`)) {
			continue
		}
		var l accessLine
		if err := json.Unmarshal(line, &l); err != nil {
			// A line cut short because the registry is writing it right now.
			continue
		}
		if l.Method == "" {
			continue
		}
		status := 0
		switch {
		case l.Status != nil:
			status = *l.Status
		case strings.HasPrefix(l.Msg, authRejectedMsg):
			status = http.StatusUnauthorized
		default:
			continue // e.g. "authorized request": the request is still running
		}
		d, _ := time.ParseDuration(l.Duration) // "726.808µs"; zero if absent
		reqs = append(reqs, Request{
			Time:       l.Time,
			Method:     l.Method,
			Path:       l.URI,
			UserAgent:  l.UserAgent,
			Status:     status,
			RemoteAddr: l.RemoteAddr,
			Written:    l.Written,
			Duration:   d,
		})
	}
	if err := sc.Err(); err != nil {
		return reqs, fmt.Errorf("scan registry log: %w", err)
	}
	return reqs, nil
}

// CountByDigest counts requests per digest (see Request.Digest), skipping
// requests that name no digest.
func CountByDigest(reqs []Request) map[string]int {
	m := make(map[string]int)
	for _, q := range reqs {
		if d := q.Digest(); d != "" {
			m[d]++
		}
	}
	return m
}

// UserAgents returns the distinct user agents in reqs, sorted.
func UserAgents(reqs []Request) []string {
	var uas []string
	for _, q := range reqs {
		uas = append(uas, q.UserAgent)
	}
	slices.Sort(uas)
	return slices.Compact(uas)
}
