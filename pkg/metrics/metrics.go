// Package metrics holds a Starling process's Prometheus registry, its metric
// families, and the HTTP handlers of the metrics listener (/metrics, /livez,
// /readyz). Each process builds its own Registry (no global registerer);
// the packages that count things receive small hooks, never the registry.
//
// Conventions: every family has HELP text, base units (seconds, bytes),
// counters end in _total, and label values come from small fixed sets so
// cardinality stays bounded.
package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/starling-oci/starling/pkg/version"
)

const namespace = "starling"

// FallbackReasons are the label values of starling_back_to_source_total:
// why an agent fetched a blob (or its missing pieces) from the registry
// instead of the swarm.
var FallbackReasons = []string{"no_supernode", "seed_refused", "slow_seed", "stalled", "supernode_lost", "swarm_error"}

// Sources are the label values of starling_blob_bytes_total.
var Sources = []string{"upstream", "peers", "seed"}

// Registry is one process's metrics.
type Registry struct {
	reg *prometheus.Registry
}

// New returns a registry holding the Go runtime and process collectors and
// starling_build_info for role ("agent" or "supernode").
func New(role string) *Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	v := version.Get()
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help:        "Always 1; the labels say which build of Starling runs in which role.",
		ConstLabels: prometheus.Labels{"version": v.Version, "commit": v.Commit, "goversion": v.GoVersion, "role": role},
	})
	info.Set(1)
	reg.MustRegister(info)
	return &Registry{reg: reg}
}

// Registerer is where other collectors register (libp2p's, through
// libp2p.PrometheusRegisterer).
func (r *Registry) Registerer() prometheus.Registerer { return r.reg }

// Gatherer reads the registry (for tests and the handler).
func (r *Registry) Gatherer() prometheus.Gatherer { return r.reg }

// CounterFunc registers a counter whose value is read from f at scrape time
// (for counts kept by the package that does the work).
func (r *Registry) CounterFunc(name, help string, labels prometheus.Labels, f func() float64) {
	r.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help, ConstLabels: labels}, f))
}

// GaugeFunc registers a gauge read from f at scrape time.
func (r *Registry) GaugeFunc(name, help string, f func() float64) {
	r.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, f))
}

// Requests instruments the mirror's registry API requests.
type Requests struct {
	total    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	ttfb     *prometheus.HistogramVec
}

// latencyBuckets span a cached manifest (a millisecond) to a multi-GiB
// layer over a slow link (minutes).
var latencyBuckets = []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// NewRequests registers the request families.
func (r *Registry) NewRequests() *Requests {
	q := &Requests{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "registry_requests_total",
			Help: "Registry API requests the mirror answered, by upstream registry, kind (manifest, blob, base), cache result (hit: served from the local store; miss: fetched; tag: resolved upstream; none) and HTTP status code.",
		}, []string{"registry", "kind", "cache", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "registry_request_duration_seconds",
			Help:    "Time from a registry API request's arrival to the end of its response, by registry and kind.",
			Buckets: latencyBuckets,
		}, []string{"registry", "kind"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "registry_time_to_first_byte_seconds",
			Help:    "Time from a registry API request's arrival to its response headers, by registry and kind.",
			Buckets: latencyBuckets,
		}, []string{"registry", "kind"}),
	}
	r.reg.MustRegister(q.total, q.duration, q.ttfb)
	return q
}

// RequestInfo labels one request; Classify fills it before the request is
// served.
type RequestInfo struct {
	Registry string // the configured registry's host, or "other"
	Kind     string // manifest, blob, base, other
	Cache    string // hit, miss, tag, none
}

// Middleware measures every request next serves. classify labels a request
// before it is served (so a blob's cache result is what the store held when
// it arrived).
func (q *Requests) Middleware(next http.Handler, classify func(*http.Request) RequestInfo) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		info := classify(r)
		start := time.Now()
		rw := &recorder{ResponseWriter: w, start: start}
		next.ServeHTTP(rw, r)
		if rw.code == 0 {
			rw.code = http.StatusOK
			rw.header = time.Since(start)
		}
		q.total.WithLabelValues(info.Registry, info.Kind, info.Cache, codeLabel(rw.code)).Inc()
		q.ttfb.WithLabelValues(info.Registry, info.Kind).Observe(rw.header.Seconds())
		q.duration.WithLabelValues(info.Registry, info.Kind).Observe(time.Since(start).Seconds())
	})
}

func codeLabel(code int) string {
	if code < 100 || code > 999 {
		return "other"
	}
	return strconv.Itoa(code)
}

// recorder notes the status code and when the headers went out.
type recorder struct {
	http.ResponseWriter
	start  time.Time
	code   int
	header time.Duration
}

func (w *recorder) WriteHeader(code int) {
	if w.code == 0 {
		w.code, w.header = code, time.Since(w.start)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

// ReadFrom keeps sendfile working through the wrapper: io.Copy reaches
// the real writer's ReadFrom (the mirror serves blobs from files).
func (w *recorder) ReadFrom(r io.Reader) (int64, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	return io.Copy(w.ResponseWriter, r)
}

// Unwrap lets http.ResponseController reach the real writer (flush,
// deadlines, ReadFrom for sendfile).
func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// NewCounterVec registers a counter family whose label values are all
// created at zero up front, so that every series exists from the first
// scrape (dashboards and alerts see 0, not "no data").
func (r *Registry) NewCounterVec(name, help, label string, values []string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, []string{label})
	for _, v := range values {
		c.WithLabelValues(v)
	}
	r.reg.MustRegister(c)
	return c
}

// NewCounter registers a plain counter.
func (r *Registry) NewCounter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
	r.reg.MustRegister(c)
	return c
}

// Check is one readiness condition: nil when ready.
type Check struct {
	Name  string
	Check func(ctx context.Context) error
}

// Handler serves /metrics, /livez (the process is serving HTTP) and /readyz
// (every check passes; the failing ones are named in the body).
func (r *Registry) Handler(checks ...Check) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{Registry: r.reg}))
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, req *http.Request) {
		ctx, cancel := context.WithTimeout(req.Context(), 5*time.Second)
		defer cancel()
		var errs []error
		for _, c := range checks {
			if err := c.Check(ctx); err != nil {
				errs = append(errs, errors.New(c.Name+": "+err.Error()))
			}
		}
		if err := errors.Join(errs...); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}
