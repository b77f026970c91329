package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/starling-oci/starling/e2e/harness"
)

// stallingRegistry serves one blob. The first GET sends half of it and then
// hangs until the client goes away: a pull that is in the middle when the
// agent is stopped. Later GETs serve the range asked for in full.
type stallingRegistry struct {
	blob   []byte
	digest string
	half   chan struct{} // closed once the first half has been sent

	mu     sync.Mutex
	ranges []string // Range headers of the blob GETs, in order
}

func (s *stallingRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if r.URL.Path == "/v2/" {
		return
	}
	if r.URL.Path != "/v2/e2e/shutdown/blobs/"+s.digest {
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	first := len(s.ranges) == 1
	s.mu.Unlock()
	start := 0
	if rng := r.Header.Get("Range"); rng != "" {
		from, _, _ := strings.Cut(strings.TrimPrefix(rng, "bytes="), "-")
		start, _ = strconv.Atoi(from)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(s.blob)-1, len(s.blob)))
		w.Header().Set("Content-Length", strconv.Itoa(len(s.blob)-start))
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.Header().Set("Content-Length", strconv.Itoa(len(s.blob)))
	}
	if !first {
		_, _ = w.Write(s.blob[start:])
		return
	}
	_, _ = w.Write(s.blob[:len(s.blob)/2])
	w.(http.Flusher).Flush()
	close(s.half)
	<-r.Context().Done()
}

func (s *stallingRegistry) Ranges() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...)
}

// TestAgentStopsPromptlyMidPull: SIGTERM while a blob is half pulled. The
// agent stops within 2 s, ends the client's response (the client falls back
// to the registry), records the partial blob's progress, says what it
// interrupted, and exits 0. Restarted, it resumes the blob where it stopped.
func TestAgentStopsPromptlyMidPull(t *testing.T) {
	t.Parallel()
	bin := harness.BuildStarling(t)
	blob := make([]byte, 2<<20)
	if _, err := rand.Read(blob); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(blob)
	up := &stallingRegistry{blob: blob, digest: "sha256:" + hex.EncodeToString(sum[:]), half: make(chan struct{})}
	srv := httptest.NewServer(up)
	defer srv.Close()

	ag := harness.StartAgent(t, bin, "--registry", srv.URL, "--auth-ttl", "-1s", "--piece-size", "64KiB")
	url := ag.MirrorURL() + "/v2/e2e/shutdown/blobs/" + up.digest
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// The client has the first half: the fill is mid-blob.
	if _, err := io.ReadFull(resp.Body, make([]byte, len(blob)/2)); err != nil {
		t.Fatalf("read the first half through the agent: %v", err)
	}
	<-up.half

	start := time.Now()
	if err := ag.Process().Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	clientDone := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, resp.Body)
		clientDone <- n
	}()
	err = ag.Process().Wait(2 * time.Second)
	stopped := time.Since(start)
	if err != nil {
		t.Errorf("agent after SIGTERM: %v (after %v), want exit status 0 within 2s", err, stopped.Round(time.Millisecond))
		ag.Kill()
	}
	select {
	case n := <-clientDone:
		if n >= int64(len(blob)/2) {
			t.Errorf("client got the whole blob (%d more bytes) from a stalled fill", n)
		}
	case <-time.After(2 * time.Second):
		t.Errorf("the client's response was still open 2s after the agent was stopped")
	}
	log, _ := ag.Process().Log()
	if !bytes.Contains(log, []byte(`"interrupted"`)) || !bytes.Contains(log, []byte(up.digest)) {
		t.Errorf("no log line saying what the shutdown interrupted (the fill of %s)", up.digest)
	}
	if bytes.Contains(log, []byte("DB Closed")) {
		t.Errorf("something used the store after it closed:\n%s", log)
	}
	t.Logf("stopped in %v", stopped.Round(time.Millisecond))
	if t.Failed() {
		t.FailNow()
	}

	// Restarted on the same data dir, the agent resumes from the recorded
	// progress instead of fetching the blob again from byte 0.
	ag.Restart(t)
	resp2, err := http.Get(ag.MirrorURL() + "/v2/e2e/shutdown/blobs/" + up.digest)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("after restart: %d bytes, %v; want the blob", len(got), err)
	}
	ranges := up.Ranges()
	if len(ranges) != 2 || ranges[1] == "" || ranges[1] == "bytes=0-" {
		t.Fatalf("upstream blob requests' ranges %q, want a second one resuming past byte 0", ranges)
	}
}

// TestAgentSecondSignalExitsAtOnce: a second SIGTERM (or Ctrl-C) during the
// shutdown exits at once, saying so.
func TestAgentSecondSignalExitsAtOnce(t *testing.T) {
	t.Parallel()
	bin := harness.BuildStarling(t)
	blob := make([]byte, 1<<20)
	if _, err := rand.Read(blob); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(blob)
	up := &stallingRegistry{blob: blob, digest: "sha256:" + hex.EncodeToString(sum[:]), half: make(chan struct{})}
	srv := httptest.NewServer(up)
	defer srv.Close()
	ag := harness.StartAgent(t, bin, "--registry", srv.URL, "--auth-ttl", "-1s", "--piece-size", "64KiB")
	resp, err := http.Get(ag.MirrorURL() + "/v2/e2e/shutdown/blobs/" + up.digest)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	<-up.half
	// The first signal starts an orderly shutdown, which waits half a
	// second for the stalled response; the second cuts it short. Two
	// different signals, so that the kernel cannot merge them into one.
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		if err := ag.Process().Signal(sig); err != nil {
			t.Fatal(err)
		}
	}
	if err := ag.Process().Wait(2 * time.Second); err == nil {
		t.Fatal("agent exited 0 after two signals, want the immediate exit's status 1")
	}
	log, _ := ag.Process().Log()
	if !bytes.Contains(log, []byte("second signal: exiting at once")) {
		t.Errorf("agent did not say it exited at the second signal")
	}
}
