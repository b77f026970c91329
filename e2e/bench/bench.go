// Package bench holds benchmarks of the real starling binary against a real
// distribution registry (started by e2e/harness), and the helpers they use:
// streaming blob uploads and peak-RSS readings from /proc.
//
// Run them with
//
//	go test -run '^$' -bench . -benchtime 3x ./e2e/bench
//
// (not with -race: the harness then builds a race-enabled starling, whose
// speed and memory say nothing about the real one).
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// PushBlob uploads r as a blob of repo to the registry at registryURL
// (http://host:port) with the distribution upload API: a POST opens an
// upload session, one PATCH streams the whole body (chunked transfer
// encoding, no Content-Range: the registry's "stream" mode), and a PUT with
// ?digest= closes it. r is hashed while it streams, so a blob of any size
// is pushed without being held in memory or written to a local file. It
// returns the blob's digest and size.
func PushBlob(ctx context.Context, client *http.Client, registryURL, repo string, r io.Reader) (string, int64, error) {
	base, err := url.Parse(registryURL)
	if err != nil {
		return "", 0, fmt.Errorf("push blob: parse registry URL: %w", err)
	}
	start := base.JoinPath("v2", repo, "blobs", "uploads/") // the trailing slash is part of the route
	resp, err := do(ctx, client, http.MethodPost, start.String(), nil, http.StatusAccepted)
	if err != nil {
		return "", 0, fmt.Errorf("push blob to %s: open upload: %w", repo, err)
	}
	loc, err := location(base, resp)
	if err != nil {
		return "", 0, fmt.Errorf("push blob to %s: open upload: %w", repo, err)
	}

	h := sha256.New()
	cr := &countingReader{r: io.TeeReader(r, h)}
	resp, err = do(ctx, client, http.MethodPatch, loc.String(), cr, http.StatusAccepted)
	if err != nil {
		return "", 0, fmt.Errorf("push blob to %s: stream %d bytes: %w", repo, cr.n, err)
	}
	if loc, err = location(base, resp); err != nil {
		return "", 0, fmt.Errorf("push blob to %s: after streaming: %w", repo, err)
	}

	digest := "sha256:" + hex.EncodeToString(h.Sum(nil))
	q := loc.Query()
	q.Set("digest", digest)
	loc.RawQuery = q.Encode()
	resp, err = do(ctx, client, http.MethodPut, loc.String(), nil, http.StatusCreated)
	if err != nil {
		return "", 0, fmt.Errorf("push blob %s to %s: close upload: %w", digest, repo, err)
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != "" && got != digest {
		return "", 0, fmt.Errorf("push blob to %s: registry stored %s, we sent %s", repo, got, digest)
	}
	return digest, cr.n, nil
}

// do sends one request, drains and closes the response body, and fails
// unless the status is want.
func do(ctx context.Context, client *http.Client, method, u string, body io.Reader, want int) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("build %s request: %w", method, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", method, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != want {
		return nil, fmt.Errorf("%s: status %d, want %d: %s", method, resp.StatusCode, want, bytes.TrimSpace(msg))
	}
	return resp, nil
}

// location resolves a response's Location header (absolute or relative).
func location(base *url.URL, resp *http.Response) (*url.URL, error) {
	l := resp.Header.Get("Location")
	if l == "" {
		return nil, errors.New("registry sent no Location")
	}
	u, err := base.Parse(l)
	if err != nil {
		return nil, fmt.Errorf("parse Location %q: %w", l, err)
	}
	return u, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// PeakRSS returns the peak resident set size of process pid in bytes: the
// kernel's high-water mark VmHWM from /proc/PID/status.
func PeakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("peak RSS of pid %d: %w", pid, err)
	}
	n, err := StatusBytes(b, "VmHWM")
	if err != nil {
		return 0, fmt.Errorf("peak RSS of pid %d: %w", pid, err)
	}
	return n, nil
}

// StatusBytes returns a "Field:   1234 kB" line of a /proc/PID/status
// document, in bytes.
func StatusBytes(status []byte, field string) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("parse %s: unexpected value %q", field, v)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("parse %s: bad number %q", field, f[0])
		}
		return n << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scan status: %w", err)
	}
	return 0, fmt.Errorf("status has no %s line", field)
}
