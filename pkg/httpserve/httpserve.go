// Package httpserve runs an HTTP server until its context ends, then shuts
// it down gracefully: the lifecycle the agent's mirror and the supernode's
// status server share. Its servers do not let a client hold a connection
// for free: idle keep-alive connections are closed after IdleTimeout, and
// a response whose client stops reading fails once it has taken no byte
// for WriteIdle (a per-write deadline, moved on while the client keeps
// acknowledging bytes, so a large blob to a slow but live client is never
// cut).
package httpserve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// Options tune a server; zero fields get the defaults.
type Options struct {
	// Grace is how long open requests may finish at shutdown (default 5 s).
	Grace time.Duration
	// IdleTimeout closes a keep-alive connection with no request for this
	// long (default 2 min).
	IdleTimeout time.Duration
	// WriteIdle fails a response once its client has taken no byte for
	// this long (default 1 min).
	WriteIdle time.Duration
	// OCIErrors rewrites the plain-text errors net/http sends by itself
	// (400 for a malformed request, 431 for oversized headers, 501 for an
	// unknown transfer encoding) as distribution-spec JSON.
	OCIErrors bool
	// ConnState is passed to http.Server (tests watch connections close).
	ConnState func(net.Conn, http.ConnState)
	// OnShutdown, if set, is told how many requests were in flight when
	// the shutdown began.
	OnShutdown func(inFlight int)
}

func (o *Options) defaults() {
	if o.Grace <= 0 {
		o.Grace = 5 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 2 * time.Minute
	}
	if o.WriteIdle <= 0 {
		o.WriteIdle = time.Minute
	}
}

// Serve serves h on ln until ctx ends, then stops accepting and gives open
// requests up to grace to finish. Requests still running then have their
// contexts cancelled and their connections closed, so that a long response
// (a blob streaming as it arrives) ends at once; Serve returns when every
// handler has returned, so nothing a handler uses (the agent's store) is in
// use any more. A shutdown because ctx ended returns nil.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, grace time.Duration) error {
	return ServeWith(ctx, ln, h, Options{Grace: grace})
}

// ServeWith is Serve with options.
func ServeWith(ctx context.Context, ln net.Listener, h http.Handler, opts Options) error {
	opts.defaults()
	base, cancelRequests := context.WithCancel(context.Background())
	defer cancelRequests()
	hs := &handlers{zero: make(chan struct{})}
	srv := &http.Server{
		Handler:           hs.wrap(WriteProgress(h, opts.WriteIdle)),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       opts.IdleTimeout,
		ConnState:         opts.ConnState,
		BaseContext:       func(net.Listener) context.Context { return base },
		ConnContext:       withConn,
	}
	if opts.OCIErrors {
		ln = ociListener{ln}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve %s: %w", ln.Addr(), err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		if opts.OnShutdown != nil {
			opts.OnShutdown(hs.inFlight())
		}
		shutdownCtx, cancel := context.WithTimeout(context.Background(), opts.Grace)
		defer cancel()
		err := srv.Shutdown(shutdownCtx)
		if errors.Is(err, context.DeadlineExceeded) {
			cancelRequests()
			err = srv.Close()
		}
		hs.closeAndWait()
		return err
	})
	return g.Wait()
}

// handlers counts the handlers running, so that shutdown can wait for the
// last one to return.
type handlers struct {
	mu     sync.Mutex
	n      int
	closed bool
	zero   chan struct{} // closed when closed and n == 0
}

func (hs *handlers) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hs.mu.Lock()
		if hs.closed {
			hs.mu.Unlock()
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		hs.n++
		hs.mu.Unlock()
		defer func() {
			hs.mu.Lock()
			hs.n--
			if hs.n == 0 && hs.closed {
				close(hs.zero)
			}
			hs.mu.Unlock()
		}()
		h.ServeHTTP(w, r)
	})
}

func (hs *handlers) inFlight() int {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return hs.n
}

// closeAndWait refuses new handlers and waits for the running ones.
func (hs *handlers) closeAndWait() {
	hs.mu.Lock()
	hs.closed = true
	if hs.n == 0 {
		close(hs.zero)
	}
	hs.mu.Unlock()
	<-hs.zero
}

// WriteProgress gives every write of a response d to complete: the
// connection's write deadline is moved to now+d when the request starts,
// before each write and when the handler returns (for the server's final
// flush). Handlers that copy large bodies should do it in bounded chunks
// (one ReadFrom is one write).
//
// A write may also wait longer than d for a client that reads all along:
// Linux wakes a writer blocked on a full socket only once the client has
// drained a good part of the socket buffers (megabytes on a connection
// that started fast), which takes minutes at the tens of KB/s of a
// CPU-starved client. So, where the platform tells how many bytes the
// client has acknowledged (Linux), the deadline also moves whenever that
// count grows: a response fails only once the client took no byte for d
// (checked every d/8).
// Elsewhere, and for connections served without ServeWith, each write
// gets d.
func WriteProgress(h http.Handler, d time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pw := &progressWriter{ResponseWriter: w, rc: http.NewResponseController(w), d: d}
		pw.extend()
		if acked := ackCounter(connFrom(r.Context())); acked != nil {
			stop := pw.watch(acked)
			defer stop()
		}
		defer pw.extend()
		h.ServeHTTP(pw, r)
	})
}

// connKey carries the request's connection in its context.
type connKey struct{}

func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

func connFrom(ctx context.Context) net.Conn {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	return c
}

// watch moves the write deadline on each time the client has acknowledged
// more bytes, checking every d/8, until stop (which waits for it).
func (p *progressWriter) watch(acked func() (uint64, bool)) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		last, _ := acked()
		tick := time.NewTicker(p.d / 8)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				if n, ok := acked(); ok && n != last {
					last = n
					p.extend()
				}
			case <-done:
				return
			}
		}
	}()
	return func() { close(done); <-exited }
}

type progressWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
	d  time.Duration
}

func (p *progressWriter) extend() { _ = p.rc.SetWriteDeadline(time.Now().Add(p.d)) }

func (p *progressWriter) Write(b []byte) (int, error) {
	p.extend()
	return p.ResponseWriter.Write(b)
}

// ReadFrom keeps sendfile working through the wrapper for files, whose
// bytes are all there. Any other source (a blob still arriving from the
// swarm) may wait between chunks longer than the deadline: the deadline
// is moved after each read, so it measures the client's reading only.
func (p *progressWriter) ReadFrom(r io.Reader) (int64, error) {
	p.extend()
	if !isFile(r) {
		r = extendingReader{r: r, p: p}
	}
	if rf, ok := p.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(p.ResponseWriter, r)
}

func isFile(r io.Reader) bool {
	if lr, ok := r.(*io.LimitedReader); ok {
		r = lr.R
	}
	_, ok := r.(*os.File)
	return ok
}

// extendingReader moves the write deadline after each read of the body.
type extendingReader struct {
	r io.Reader
	p *progressWriter
}

func (e extendingReader) Read(b []byte) (int, error) {
	n, err := e.r.Read(b)
	e.p.extend()
	return n, err
}

// Flush implements http.Flusher.
func (p *progressWriter) Flush() {
	p.extend()
	_ = p.rc.Flush()
}

// Unwrap lets http.ResponseController reach the connection.
func (p *progressWriter) Unwrap() http.ResponseWriter { return p.ResponseWriter }
