package bench

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/starling-oci/starling/e2e/harness"
)

// TestMain removes the shared starling build when the benchmarks are done.
func TestMain(m *testing.M) { harness.Main(m) }

const (
	// warmBlobSize is the blob of the serve benchmarks.
	warmBlobSize = 64 << 20
	// rssBlobSize is the blob of the peak-RSS measurement.
	rssBlobSize = 1 << 30
	// fillWait bounds waits for the agent to commit a blob it has streamed.
	fillWait = 2 * time.Minute
	// drainBuffer is the client's read size: large, so that the client
	// costs as little CPU as possible next to the server it measures.
	drainBuffer = 1 << 20
)

// BenchmarkWarmBlobServe measures a 64 MiB blob served by a real `starling
// agent` process from its cache (fetched from the registry once, before the
// timer starts) over loopback HTTP. Compare with
// BenchmarkDirectRegistryServe.
func BenchmarkWarmBlobServe(b *testing.B) {
	bin := harness.BuildStarling(b)
	reg := harness.StartRegistry(b, harness.RegistryOptions{})
	const repo = "bench/warm"
	digest := pushRandomBlob(b, reg, repo, warmBlobSize, 1)
	ag := harness.StartAgent(b, bin, "--registry", reg.URL())
	u := ag.MirrorURL() + "/v2/" + repo + "/blobs/" + digest
	client := newClient(b)

	// The cold fetch: through the agent, verified, then wait until the
	// agent has committed the blob so that the loop reads a complete file.
	fetch(b, client, u, warmBlobSize, digest)
	waitFilled(b, ag, digest)

	b.SetBytes(warmBlobSize)
	for b.Loop() {
		fetch(b, client, u, warmBlobSize, "")
	}
	b.StopTimer()

	// Every GET of the loop was served from the cache.
	reqs := reg.WaitAccessLog(b, 10*time.Second, func(reqs []harness.Request) bool {
		return len(harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/")) >= 1
	})
	if gets := harness.FilterRequests(reqs, http.MethodGet, "/v2/"+repo+"/blobs/"); len(gets) != 1 {
		b.Fatalf("registry served the blob %d times, want once (the cold fetch):\n%s", len(gets), harness.FormatRequests(gets))
	}
}

// BenchmarkDirectRegistryServe measures the same 64 MiB blob served
// directly by the docker-registry process (filesystem storage) to the same
// client.
func BenchmarkDirectRegistryServe(b *testing.B) {
	reg := harness.StartRegistry(b, harness.RegistryOptions{})
	const repo = "bench/direct"
	digest := pushRandomBlob(b, reg, repo, warmBlobSize, 1)
	u := reg.URL() + "/v2/" + repo + "/blobs/" + digest
	client := newClient(b)
	fetch(b, client, u, warmBlobSize, digest)

	b.SetBytes(warmBlobSize)
	for b.Loop() {
		fetch(b, client, u, warmBlobSize, "")
	}
}

// BenchmarkPeakRSS1GiB measures the peak RSS (VmHWM) of a real `starling
// agent` process while one client pulls a 1 GiB blob through it cold: the
// agent fetches the blob from the registry while it streams it to the
// client. The measurement is made once, whatever b.N (later rounds report
// the same numbers); ns/op is suppressed.
//
// Metrics: peak-rss-bytes (VmHWM after the pull), idle-rss-bytes (VmHWM
// once listening, before the pull), pull-MB/s (client throughput of the
// cold pull, digest checked by the client).
func BenchmarkPeakRSS1GiB(b *testing.B) {
	var m *rssMeasurement
	b.Run("cold", func(b *testing.B) {
		if m == nil {
			m = measureColdPullRSS(b, rssBlobSize)
		}
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(float64(m.peak), "peak-rss-bytes")
		b.ReportMetric(float64(m.idle), "idle-rss-bytes")
		b.ReportMetric(float64(rssBlobSize)/1e6/m.elapsed.Seconds(), "pull-MB/s")
	})
}

type rssMeasurement struct {
	idle, peak int64
	elapsed    time.Duration
}

func measureColdPullRSS(b *testing.B, size int64) *rssMeasurement {
	b.Helper()
	bin := harness.BuildStarling(b)
	reg := harness.StartRegistry(b, harness.RegistryOptions{})
	const repo = "bench/rss"
	start := time.Now()
	digest := pushRandomBlob(b, reg, repo, size, 2)
	b.Logf("pushed a %d MiB random blob in %v", size>>20, time.Since(start).Round(time.Millisecond))

	ag := harness.StartAgent(b, bin, "--registry", reg.URL())
	pid := ag.Process().Pid()
	idle, err := PeakRSS(pid)
	if err != nil {
		b.Fatal(err)
	}
	client := newClient(b)
	start = time.Now()
	fetch(b, client, ag.MirrorURL()+"/v2/"+repo+"/blobs/"+digest, size, digest)
	elapsed := time.Since(start)
	// The fill ends after the last byte is out (commit, metadata): take the
	// reading once it has ended.
	waitFilled(b, ag, digest)
	peak, err := PeakRSS(pid)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("cold pull of %d MiB through the agent in %v; agent VmHWM idle %.1f MiB, peak %.1f MiB",
		size>>20, elapsed.Round(time.Millisecond), float64(idle)/(1<<20), float64(peak)/(1<<20))
	return &rssMeasurement{idle: idle, peak: peak, elapsed: elapsed}
}

// pushRandomBlob streams size pseudo-random bytes (ChaCha8, from seed) to
// the registry as a blob of repo and returns its digest.
func pushRandomBlob(tb testing.TB, reg *harness.Registry, repo string, size int64, seed byte) string {
	tb.Helper()
	var key [32]byte
	key[0] = seed
	src := io.LimitReader(rand.NewChaCha8(key), size)
	digest, n, err := PushBlob(tb.Context(), http.DefaultClient, reg.URL(), repo, src)
	if err != nil {
		tb.Fatal(err)
	}
	if n != size {
		tb.Fatalf("pushed %d bytes, want %d", n, size)
	}
	return digest
}

func newClient(tb testing.TB) *http.Client {
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 1}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// fetch GETs u and reads the body with large reads, failing unless it gets
// 200 and exactly size bytes, hashing to digest if digest is not empty.
func fetch(tb testing.TB, client *http.Client, u string, size int64, digest string) {
	tb.Helper()
	if err := get(tb, client, u, size, digest); err != nil {
		tb.Fatal(err)
	}
}

func get(tb testing.TB, client *http.Client, u string, size int64, digest string) error {
	req, err := http.NewRequestWithContext(tb.Context(), http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("build GET %s: %w", u, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("GET %s: status %d: %s", u, resp.StatusCode, msg)
	}
	var h hash.Hash
	if digest != "" {
		h = sha256.New()
	}
	n, err := drain(resp.Body, h)
	if err != nil {
		return fmt.Errorf("GET %s: read body after %d bytes: %w", u, n, err)
	}
	if n != size {
		return fmt.Errorf("GET %s: got %d bytes, want %d", u, n, size)
	}
	if h != nil {
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
			return fmt.Errorf("GET %s: body hashes to %s", u, got)
		}
	}
	return nil
}

// drain reads r to EOF with drainBuffer-sized reads (io.Copy to io.Discard
// would use 8 KiB ones), writing to h if not nil.
func drain(r io.Reader, h hash.Hash) (int64, error) {
	buf := make([]byte, drainBuffer)
	var n int64
	for {
		m, err := r.Read(buf)
		n += int64(m)
		if h != nil {
			h.Write(buf[:m])
		}
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// waitFilled waits for the agent's log line saying it has committed the
// blob (the one line per fill, after the commit).
func waitFilled(tb testing.TB, ag *harness.Agent, digest string) {
	tb.Helper()
	re := regexp.MustCompile(`"msg":"blob filled".*"digest":"` + regexp.QuoteMeta(digest) + `"`)
	ag.Process().WaitForLog(tb, re, fillWait)
}

func TestStatusBytes(t *testing.T) {
	t.Parallel()
	status := "Name:\tstarling\nVmPeak:\t 1268776 kB\nVmHWM:\t   41236 kB\nVmRSS:\t   39000 kB\n"
	for _, c := range []struct {
		field string
		want  int64
		err   string
	}{
		{"VmHWM", 41236 << 10, ""},
		{"VmRSS", 39000 << 10, ""},
		{"VmSwap", 0, "no VmSwap line"},
		{"Name", 0, "unexpected value"},
	} {
		got, err := StatusBytes([]byte(status), c.field)
		if got != c.want || (c.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("StatusBytes(%s) = %d, %v; want %d, error containing %q", c.field, got, err, c.want, c.err)
		}
	}
}

func TestPeakRSSOfSelf(t *testing.T) {
	t.Parallel()
	// The test binary itself: its peak RSS is at least what it has
	// allocated and touched.
	buf := make([]byte, 32<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	n, err := PeakRSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if n < int64(len(buf)) {
		t.Errorf("PeakRSS(self) = %d, below the %d bytes just touched", n, len(buf))
	}
	if buf[len(buf)-1] != byte(len(buf)-1) { // keep buf alive up to here
		t.Fatal("unreachable")
	}
	if _, err := PeakRSS(-1); err == nil {
		t.Error("PeakRSS(-1) succeeded")
	}
}

func TestPushBlobStreams(t *testing.T) {
	t.Parallel()
	harness.RequireTool(t, "docker-registry")
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const size = 3<<20 + 17
	digest := pushRandomBlob(t, reg, "bench/push", size, 3)

	// The registry has exactly those bytes under that digest.
	var key [32]byte
	key[0] = 3
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(rand.NewChaCha8(key), size)); err != nil {
		t.Fatal(err)
	}
	if want := "sha256:" + hex.EncodeToString(h.Sum(nil)); digest != want {
		t.Fatalf("PushBlob returned %s, the data hashes to %s", digest, want)
	}
	fetch(t, http.DefaultClient, reg.URL()+"/v2/bench/push/blobs/"+digest, size, digest)

	// One streamed PATCH carried the whole blob.
	reqs := reg.WaitAccessLog(t, 10*time.Second, func(reqs []harness.Request) bool {
		for _, q := range reqs {
			if q.Method == http.MethodPut && strings.Contains(q.Path, "digest=") {
				return true
			}
		}
		return false
	})
	var patches []harness.Request
	for _, q := range reqs {
		if q.Method == http.MethodPatch {
			patches = append(patches, q)
		}
	}
	if len(patches) != 1 || patches[0].Status != http.StatusAccepted {
		t.Errorf("want one accepted PATCH, got:\n%s", harness.FormatRequests(patches))
	}

	// A wrong repository name is an error, not a silent success.
	if _, _, err := PushBlob(t.Context(), http.DefaultClient, reg.URL(), "Bad Repo", strings.NewReader("x")); err == nil {
		t.Error("PushBlob to an invalid repository name succeeded")
	}
}
