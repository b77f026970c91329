// Package ratelimit caps bandwidth with token buckets shared by every
// transfer of one direction (a node's upload or download link).
package ratelimit

import (
	"context"
	"fmt"
	"io"

	"golang.org/x/time/rate"
)

// A limiter's chunk (its burst, and the most one wait or one read asks
// for) is 1/16 s of its rate within these bounds: small enough to keep
// transfers smooth and fair between concurrent streams, large enough that
// the waits, timers and wake-ups (each costs about as much as moving a few
// KiB) stay a small share of the CPU per byte: 40 waits a second per
// direction at 10 MiB/s, not 160.
const (
	minChunk = 16 << 10
	maxChunk = 256 << 10
)

// Limiter is one direction of a link. A nil *Limiter is unlimited.
type Limiter struct {
	l     *rate.Limiter
	chunk int
}

// New returns a limiter of bytesPerSec, or nil (unlimited) for 0.
func New(bytesPerSec int64) *Limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	chunk := int(min(max(bytesPerSec/16, minChunk), maxChunk))
	return &Limiter{l: rate.NewLimiter(rate.Limit(bytesPerSec), chunk), chunk: chunk}
}

// Rate is the limit in bytes/s, 0 for unlimited.
func (l *Limiter) Rate() float64 {
	if l == nil {
		return 0
	}
	return float64(l.l.Limit())
}

// Wait blocks until n bytes may pass.
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if l == nil {
		return nil
	}
	for n > 0 {
		c := min(n, l.chunk)
		if err := l.l.WaitN(ctx, c); err != nil {
			return fmt.Errorf("rate limit: %w", err)
		}
		n -= c
	}
	return nil
}

// Reader paces reads from r.
func (l *Limiter) Reader(ctx context.Context, r io.Reader) io.Reader {
	if l == nil {
		return r
	}
	return &reader{ctx: ctx, r: r, l: l}
}

// Writer paces writes to w.
func (l *Limiter) Writer(ctx context.Context, w io.Writer) io.Writer {
	if l == nil {
		return w
	}
	return &writer{ctx: ctx, w: w, l: l}
}

type reader struct {
	ctx context.Context
	r   io.Reader
	l   *Limiter
}

func (r *reader) Read(p []byte) (int, error) {
	if len(p) > r.l.chunk {
		p = p[:r.l.chunk]
	}
	n, err := r.r.Read(p)
	if n > 0 {
		if werr := r.l.Wait(r.ctx, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

type writer struct {
	ctx context.Context
	w   io.Writer
	l   *Limiter
}

func (w *writer) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		c := min(len(p), w.l.chunk)
		if err := w.l.Wait(w.ctx, c); err != nil {
			return written, err
		}
		n, err := w.w.Write(p[:c])
		written += n
		if err != nil {
			return written, err
		}
		p = p[c:]
	}
	return written, nil
}
