package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestMetricsLintAndHealth runs a real supernode and agent, pulls an image
// through the swarm, then scrapes both metrics listeners (--metrics-listen,
// apart from the mirror): promlint must find no problem, every family the
// issue lists must be there with the right labels, starling_build_info
// carries the stamped version, /livez and /readyz answer 200, and the
// agent's /readyz turns 503 once its only supernode is gone.
func TestMetricsLintAndHealth(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	bin := harness.BuildStarling(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo = "e2e/metrics"
	img, _ := pushBigLayerImage(t, reg.Addr(), repo, "v1", 3*swarmPieceSize)
	key := newSwarmKey(t, bin)
	sn := startSupernode(t, bin, reg, key)
	ag := startSwarmAgent(t, bin, reg, key, sn)
	if err := pullImageVia(t.Context(), ag.MirrorAddr(), repo, "v1", img); err != nil {
		t.Fatal(err)
	}

	agentScrape := scrapeAndLint(t, ag.MetricsURL())
	snScrape := scrapeAndLint(t, sn.MetricsURL())

	for _, want := range []struct {
		family string
		labels []string
	}{
		{"starling_build_info", []string{"version", "commit", "goversion", "role"}},
		{"starling_registry_requests_total", []string{"registry", "kind", "cache", "code"}},
		{"starling_registry_request_duration_seconds", []string{"registry", "kind"}},
		{"starling_registry_time_to_first_byte_seconds", []string{"registry", "kind"}},
		{"starling_blob_bytes_total", []string{"source"}},
		{"starling_back_to_source_total", []string{"reason"}},
		{"starling_corrupt_pieces_total", nil},
		{"starling_watch_news_total", nil},
		{"starling_peers_connected", nil},
		{"starling_cache_used_bytes", nil},
		{"starling_cache_evictions_total", nil},
		{"libp2p_swarm_connections_opened_total", nil},
		{"go_goroutines", nil},
	} {
		mf, ok := agentScrape[want.family]
		if !ok {
			t.Errorf("agent exposes no %s", want.family)
			continue
		}
		for _, l := range want.labels {
			if !hasLabel(mf, l) {
				t.Errorf("agent's %s has no label %q", want.family, l)
			}
		}
	}
	for _, family := range []string{"starling_build_info", "starling_seed_fetches_total", "starling_piece_bytes_served_total",
		"starling_tracked_blobs", "starling_cache_used_bytes", "starling_peers_connected", "libp2p_swarm_connections_opened_total",
		"starling_manifest_upstream_requests_total", "starling_manifest_stale_answers_total"} {
		if _, ok := snScrape[family]; !ok {
			t.Errorf("supernode exposes no %s", family)
		}
	}

	// What the pull did shows in the numbers.
	if v := sample(agentScrape, "starling_blob_bytes_total", map[string]string{"source": "seed"}); v < 3*swarmPieceSize {
		t.Errorf("starling_blob_bytes_total{source=seed} = %v, want at least the layer's %d bytes", v, 3*swarmPieceSize)
	}
	if v := sample(agentScrape, "starling_registry_requests_total", map[string]string{"kind": "blob", "cache": "miss", "code": "200", "registry": reg.Addr()}); v < 2 {
		t.Errorf("starling_registry_requests_total{kind=blob,cache=miss,code=200,registry=%s} = %v, want the layer and the config", reg.Addr(), v)
	}
	if v := sample(agentScrape, "starling_peers_connected", nil); v < 1 {
		t.Errorf("starling_peers_connected = %v, want the supernode at least", v)
	}
	if v := sample(snScrape, "starling_seed_fetches_total", nil); v < 2 {
		t.Errorf("supernode starling_seed_fetches_total = %v, want the layer and the config", v)
	}
	for _, s := range []map[string]*dto.MetricFamily{agentScrape, snScrape} {
		if v := sample(s, "starling_build_info", map[string]string{"version": harness.StampedVersion, "commit": harness.StampedCommit}); v != 1 {
			t.Errorf("starling_build_info{version=%s,commit=%s} = %v, want 1", harness.StampedVersion, harness.StampedCommit, v)
		}
	}

	for _, u := range []string{ag.MetricsURL(), sn.MetricsURL()} {
		for _, path := range []string{"/livez", "/readyz"} {
			if code, body := get(t, u+path); code != http.StatusOK {
				t.Errorf("GET %s%s = %d %s, want 200", u, path, code, body)
			}
		}
	}
	sn.Stop()
	if code, body := get(t, ag.MetricsURL()+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "supernode") {
		t.Errorf("agent /readyz with its supernode gone = %d %q, want 503 naming the supernode", code, body)
	}
	if code, _ := get(t, ag.MetricsURL()+"/livez"); code != http.StatusOK {
		t.Errorf("agent /livez with its supernode gone = %d, want 200 (the process still serves)", code)
	}

	checkDashboardQueries(t, agentScrape, snScrape)
}

// upstreamLintProblems are the exact promlint findings on go-libp2p's own
// metric names (v0.51), which Starling exposes as libp2p names them so that
// libp2p's dashboards work. Anything else promlint finds fails the test.
var upstreamLintProblems = map[string]string{
	"libp2p_eventbus_subscriber_event_queued": `counter metrics should have "_total" suffix`,
	"libp2p_eventbus_subscribers_total":       `non-counter metrics should not have "_total" suffix`,
	"libp2p_identify_addrs_count":             `non-histogram and non-summary metrics should not have "_count" suffix`,
	"libp2p_identify_protocols_count":         `non-histogram and non-summary metrics should not have "_count" suffix`,
}

// scrapeAndLint GETs base/metrics, runs promlint over it (any problem fails
// the test) and returns the parsed families.
func scrapeAndLint(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET %s/metrics = %d", base, code)
	}
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatalf("promlint %s: %v", base, err)
	}
	for _, p := range problems {
		if upstreamLintProblems[p.Metric] == p.Text {
			continue
		}
		t.Errorf("promlint %s: %s: %s", base, p.Metric, p.Text)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse %s/metrics: %v", base, err)
	}
	for name, mf := range mfs {
		if mf.GetHelp() == "" {
			t.Errorf("%s: %s has no HELP", base, name)
		}
	}
	return mfs
}

func hasLabel(mf *dto.MetricFamily, name string) bool {
	for _, m := range mf.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return true
			}
		}
	}
	return false
}

// sample sums the samples of a counter or gauge family whose labels include
// want.
func sample(mfs map[string]*dto.MetricFamily, family string, want map[string]string) float64 {
	var sum float64
	for _, m := range mfs[family].GetMetric() {
		match := 0
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; ok && v == l.GetValue() {
				match++
			}
		}
		if match != len(want) {
			continue
		}
		sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return sum
}

func get(t *testing.T, u string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := io.Copy(&b, resp.Body); err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return resp.StatusCode, b.String()
}

// names lists a scrape's family names, for messages.
func names(mfs map[string]*dto.MetricFamily) string {
	var n []string
	for k := range mfs {
		n = append(n, k)
	}
	sort.Strings(n)
	return fmt.Sprint(n)
}

// metricName finds the metric names in a PromQL expression: the names of
// the families the binaries expose all start with one of these prefixes.
var metricName = regexp.MustCompile(`\b(?:starling|libp2p|go|process)_[a-z0-9_]+\b`)

// checkDashboardQueries fails for every metric the Grafana dashboard's
// queries name that neither binary exposed in the scrapes.
func checkDashboardQueries(t *testing.T, scrapes ...map[string]*dto.MetricFamily) {
	t.Helper()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(root, "deploy", "helm", "starling", "dashboards", "starling.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	exposed := map[string]bool{}
	for _, s := range scrapes {
		for name := range s {
			exposed[name] = true
		}
	}
	queries := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			queries++
			found := metricName.FindAllString(tg.Expr, -1)
			if len(found) == 0 {
				t.Errorf("dashboard panel %q: query %q names no metric", p.Title, tg.Expr)
			}
			for _, m := range found {
				family := m
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if f, ok := strings.CutSuffix(m, suffix); ok && exposed[f] {
						family = f
					}
				}
				if !exposed[family] {
					t.Errorf("dashboard panel %q: query names %s, which neither binary exposes (they expose %s)", p.Title, m, names(scrapes[0]))
				}
			}
		}
	}
	if queries < 10 {
		t.Errorf("dashboard has %d queries; want the storm panels (bytes by source, fallbacks, p99 blob latency, registry egress, ...)", queries)
	}
}
