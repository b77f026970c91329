package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestMiddlewareLabelsAndTimes(t *testing.T) {
	r := New("agent")
	q := r.NewRequests()
	h := q.Middleware(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if strings.HasSuffix(req.URL.Path, "/missing") {
			http.Error(w, "no", http.StatusNotFound)
			return
		}
		_, _ = w.Write([]byte("blob")) // implicit 200
	}), func(req *http.Request) RequestInfo {
		return RequestInfo{Registry: "docker.io", Kind: "blob", Cache: "hit"}
	})
	for _, p := range []string{"/v2/a/blobs/x", "/v2/a/blobs/x", "/v2/a/blobs/missing"} {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, p, nil))
	}
	if got := testutil.ToFloat64(q.total.WithLabelValues("docker.io", "blob", "hit", "200")); got != 2 {
		t.Errorf("200s counted %v, want 2", got)
	}
	if got := testutil.ToFloat64(q.total.WithLabelValues("docker.io", "blob", "hit", "404")); got != 1 {
		t.Errorf("404s counted %v, want 1", got)
	}
	if n := testutil.CollectAndCount(q.ttfb); n != 1 {
		t.Errorf("%d TTFB series, want 1", n)
	}
}

func TestReadyzNamesFailingChecks(t *testing.T) {
	r := New("agent")
	ok := Check{Name: "store", Check: func(context.Context) error { return nil }}
	bad := Check{Name: "supernode", Check: func(context.Context) error { return errors.New("unreachable") }}
	for _, tc := range []struct {
		checks []Check
		code   int
		body   string
	}{
		{[]Check{ok}, 200, "ok"},
		{[]Check{ok, bad}, 503, "supernode: unreachable"},
	} {
		rec := httptest.NewRecorder()
		r.Handler(tc.checks...).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		if rec.Code != tc.code || !strings.Contains(rec.Body.String(), tc.body) {
			t.Errorf("/readyz = %d %q, want %d %q", rec.Code, rec.Body, tc.code, tc.body)
		}
		rec = httptest.NewRecorder()
		r.Handler(tc.checks...).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/livez", nil))
		if rec.Code != 200 {
			t.Errorf("/livez = %d with failing readiness checks, want 200", rec.Code)
		}
	}
}

// readerFromWriter records whether the wrapped writer's ReadFrom was used.
type readerFromWriter struct {
	*httptest.ResponseRecorder
	used bool
}

func (w *readerFromWriter) ReadFrom(r io.Reader) (int64, error) {
	w.used = true
	return io.Copy(w.ResponseRecorder, r)
}

// TestMiddlewareKeepsReadFrom: the mirror copies blob files with io.Copy;
// the wrapper must hand that to the server's ReadFrom (sendfile), not
// turn it into buffered writes.
func TestMiddlewareKeepsReadFrom(t *testing.T) {
	q := New("agent").NewRequests()
	h := q.Middleware(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.Copy(w, io.LimitReader(strings.NewReader("blob bytes"), 1<<20)) // like a file: no WriteTo to the wrapper
	}), func(*http.Request) RequestInfo { return RequestInfo{Registry: "r", Kind: "blob", Cache: "hit"} })
	w := &readerFromWriter{ResponseRecorder: httptest.NewRecorder()}
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/v2/a/blobs/x", nil))
	if !w.used || w.Body.String() != "blob bytes" || w.Code != 200 {
		t.Errorf("ReadFrom used %v, body %q, code %d", w.used, w.Body, w.Code)
	}
}
