package ratelimit

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"
)

func TestNilIsUnlimited(t *testing.T) {
	var l *Limiter = New(0)
	if l != nil {
		t.Fatal("New(0) is not the unlimited nil limiter")
	}
	r := bytes.NewReader(make([]byte, 10))
	if got := l.Reader(context.Background(), r); got != io.Reader(r) {
		t.Fatal("a nil limiter wraps readers")
	}
	if err := l.Wait(context.Background(), 1<<30); err != nil {
		t.Fatal(err)
	}
}

// The limiter paces: 256 KiB at 1 MiB/s with a 64 KiB burst (1/16 s of
// the rate) cannot pass in much under 192 ms. (A lower bound only; the
// machine may be slower.)
func TestWriterPaces(t *testing.T) {
	l := New(1 << 20)
	var out bytes.Buffer
	start := time.Now()
	n, err := l.Writer(context.Background(), &out).Write(make([]byte, 256<<10))
	if err != nil || n != 256<<10 || out.Len() != 256<<10 {
		t.Fatalf("wrote %d (%d buffered), %v", n, out.Len(), err)
	}
	if elapsed := time.Since(start); elapsed < 150*time.Millisecond {
		t.Fatalf("256 KiB at 1 MiB/s took %v", elapsed)
	}
}

func TestWaitHonoursContext(t *testing.T) {
	l := New(1024)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Wait(ctx, 1<<20); err == nil {
		t.Fatal("Wait ignored a cancelled context")
	}
}

// A limiter waits in chunks of 1/16 s of its rate, within 16-256 KiB.
func TestChunk(t *testing.T) {
	for _, c := range []struct {
		rate  int64
		chunk int
	}{{1 << 10, 16 << 10}, {1 << 20, 64 << 10}, {10 << 20, 256 << 10}, {1 << 30, 256 << 10}} {
		if got := New(c.rate).chunk; got != c.chunk {
			t.Errorf("rate %d: chunk %d, want %d", c.rate, got, c.chunk)
		}
	}
}
