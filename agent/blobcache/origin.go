package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
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
	Log       *zap.Logger
}

var _ Filler = (*Origin)(nil)

// Fill implements Filler.
func (o *Origin) Fill(ctx context.Context, req registryproxy.BlobRequest, started func(*store.Partial)) error {
	start := time.Now()
	p, err := o.fetch(ctx, req, started)
	if p != nil {
		defer p.Release()
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
	o.Log.Info("fetched blob from upstream", zap.String("registry", req.Registry.Host), zap.String("repo", req.Repo),
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
	if err := p.Append(body, nil); err != nil {
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
