package httpserve_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/starling-oci/starling/pkg/httpserve"
)

// TestShutdownEndsStreamingResponses: a handler streaming a response that
// waits for more bytes (a blob still arriving) is ended once the grace is
// over: its context is cancelled, its client sees the response cut short,
// and Serve returns nil only after the handler has returned.
func TestShutdownEndsStreamingResponses(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	handlerDone := make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(handlerDone)
		w.Header().Set("Content-Length", "1000")
		_, _ = w.Write(make([]byte, 10))
		w.(http.Flusher).Flush()
		close(started)
		<-r.Context().Done() // the rest never arrives
	})
	ctx, cancel := context.WithCancel(context.Background())
	inFlight := make(chan int, 1)
	done := make(chan error, 1)
	go func() {
		done <- httpserve.ServeWith(ctx, ln, h, httpserve.Options{Grace: 200 * time.Millisecond, OnShutdown: func(n int) { inFlight <- n }})
	}()
	resp, err := http.Get("http://" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	<-started
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after shutdown = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve still running 5s after its context ended")
	}
	select {
	case <-handlerDone:
	default:
		t.Fatal("Serve returned before the handler did")
	}
	if n := <-inFlight; n != 1 {
		t.Errorf("OnShutdown told %d requests in flight, want 1", n)
	}
	if n, err := io.Copy(io.Discard, resp.Body); err == nil {
		t.Errorf("client read %d more bytes and a clean end, want the response cut short", n)
	}
	t.Logf("stopped in %v", time.Since(start).Round(time.Millisecond))
}
