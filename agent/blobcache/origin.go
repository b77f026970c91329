package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/upstream"
	"github.com/starling-oci/starling/registryproxy"
)

// Origin fills blobs straight from the upstream registry, resuming a
// partial blob left by an earlier run with a Range request.
type Origin struct {
	Store     *store.Store
	Upstream  *upstream.Client
	PieceSize int64
	// Download paces upstream reads (nil: unlimited).
	Download *ratelimit.Limiter
	Log      *zap.Logger

	fromUpstream atomic.Int64
}

var _ Filler = (*Origin)(nil)

// Fill implements Filler.
func (o *Origin) Fill(ctx context.Context, req registryproxy.BlobRequest, started func(*store.Partial)) error {
	if o.Store.Has(req.Digest) {
		return nil // an earlier fill committed it after this one was asked for
	}
	start := time.Now()
	p, err := o.fetch(ctx, req, started)
	if p != nil {
		defer p.Release()
	}
	if errors.Is(err, store.ErrComplete) {
		return nil
	}
	if err != nil {
		if p != nil {
			p.Fail(err)
		}
		return err
	}
	if err := p.Commit(); err != nil {
		return fmt.Errorf("commit %s from %s: %w", req.Digest, req.Registry.Host, err)
	}
	o.Log.Debug("fetched blob from upstream", zap.String("registry", req.Registry.Host), zap.String("repo", req.Repo),
		zap.String("digest", req.Digest), zap.Int64("size", p.Size()), zap.Duration("elapsed", time.Since(start)))
	return nil
}

func (o *Origin) fetch(ctx context.Context, req registryproxy.BlobRequest, started func(*store.Partial)) (*store.Partial, error) {
	var p *store.Partial
	hdr := http.Header{}
	if size, pieceSize, ok := o.Store.Pending(req.Digest); ok {
		var err error
		if p, err = o.Store.OpenPartial(req.Digest, size, pieceSize); err != nil {
			return nil, err
		}
		started(p)
		if off := p.Offset(); off > 0 {
			hdr.Set("Range", fmt.Sprintf("bytes=%d-", off))
		}
	}
	resp, err := o.Upstream.Do(ctx, upstream.Request{
		Registry: req.Registry, Repo: req.Repo, Method: http.MethodGet, Path: "blobs/" + req.Digest,
		Authorization: req.Authorization, Header: hdr,
	})
	if err != nil {
		return p, fmt.Errorf("fetch %s from %s: %w", req.Digest, req.Registry.Host, err)
	}
	defer resp.Body.Close()
	if p == nil {
		if resp.ContentLength < 0 {
			return nil, fmt.Errorf("fetch %s from %s: upstream sent no Content-Length", req.Digest, req.Registry.Host)
		}
		pieceSize := o.PieceSize
		if pieceSize <= 0 {
			pieceSize = piece.DefaultSize
		}
		if p, err = o.Store.OpenPartial(req.Digest, resp.ContentLength, pieceSize); err != nil {
			return nil, err
		}
		started(p)
	}
	body := io.Reader(resp.Body)
	if off := p.Offset(); off > 0 {
		if body, err = skipTo(resp, off); err != nil {
			return p, fmt.Errorf("resume %s: %w", req.Digest, err)
		}
	}
	body = o.Download.Reader(ctx, body)
	before := p.Offset()
	err = p.Append(body, nil)
	o.fromUpstream.Add(p.Offset() - before)
	SourcesFrom(ctx).AddUpstream(p.Offset() - before)
	if err != nil {
		return p, fmt.Errorf("fetch %s from %s: %w", req.Digest, req.Registry.Host, err)
	}
	return p, nil
}

// skipTo positions a response body at off: a 206 must start there; a 200
// (the upstream ignored Range) is read past the bytes we already have.
func skipTo(resp *http.Response, off int64) (io.Reader, error) {
	if resp.StatusCode == http.StatusPartialContent {
		cr := resp.Header.Get("Content-Range")
		rest, ok := strings.CutPrefix(cr, "bytes ")
		first, _, _ := strings.Cut(rest, "-")
		if n, err := strconv.ParseInt(first, 10, 64); !ok || err != nil || n != off {
			return nil, fmt.Errorf("upstream Content-Range %q does not start at %d", cr, off)
		}
		return resp.Body, nil
	}
	if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
		return nil, errors.Join(fmt.Errorf("skip %d bytes", off), err)
	}
	return resp.Body, nil
}

// FetchPieces fills the pieces a partial blob still lacks straight from
// upstream with Range requests, one run of missing pieces at a time. Each
// piece is checked against its CID when cids has it; the blob digest is
// checked at commit in any case. This is the swarm's back-to-source path.
func (o *Origin) FetchPieces(ctx context.Context, req registryproxy.BlobRequest, p *store.Partial, cids []cid.Cid) error {
	have := p.Have()
	n := have.Len()
	buf := make([]byte, p.PieceSize())
	for i := 0; i < n; {
		if have.Has(i) {
			i++
			continue
		}
		j := i
		for j < n && !have.Has(j) {
			j++
		}
		first, _ := piece.Bounds(i, p.Size(), p.PieceSize())
		lastOff, lastLen := piece.Bounds(j-1, p.Size(), p.PieceSize())
		hdr := http.Header{}
		hdr.Set("Range", fmt.Sprintf("bytes=%d-%d", first, lastOff+lastLen-1))
		resp, err := o.Upstream.Do(ctx, upstream.Request{
			Registry: req.Registry, Repo: req.Repo, Method: http.MethodGet, Path: "blobs/" + req.Digest,
			Authorization: req.Authorization, Header: hdr,
		})
		if err != nil {
			return fmt.Errorf("fetch pieces %d-%d of %s from %s: %w", i, j-1, req.Digest, req.Registry.Host, err)
		}
		body, err := skipTo(resp, first)
		body = o.Download.Reader(ctx, body)
		if err == nil {
			err = o.readPieces(body, p, i, j, cids, buf, SourcesFrom(ctx))
		}
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("fetch pieces %d-%d of %s from %s: %w", i, j-1, req.Digest, req.Registry.Host, err)
		}
		i = j
	}
	return nil
}

func (o *Origin) readPieces(body io.Reader, p *store.Partial, from, to int, cids []cid.Cid, buf []byte, src *Sources) error {
	for k := from; k < to; k++ {
		_, length := piece.Bounds(k, p.Size(), p.PieceSize())
		data := buf[:length]
		if _, err := io.ReadFull(body, data); err != nil {
			return fmt.Errorf("read piece %d: %w", k, err)
		}
		if k < len(cids) {
			if err := piece.Verify(cids[k], data); err != nil {
				return fmt.Errorf("upstream piece %d: %w", k, err)
			}
		}
		if err := p.WritePiece(k, data); err != nil {
			return err
		}
		o.fromUpstream.Add(length)
		src.AddUpstream(length)
	}
	return nil
}

// BytesFromUpstream returns the blob bytes this agent got from upstream.
func (o *Origin) BytesFromUpstream() int64 { return o.fromUpstream.Load() }
