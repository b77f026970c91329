package pieceserver

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// Watches bound the bitmap watches (/starling/watch/1) a server keeps:
// MaxWatchers per blob, maxWatches in all. Each costs a goroutine and a
// few bytes per piece the blob gains, so a peer's neighbours learn of its
// new pieces at once (a tracker poll comes only every interval, which
// grows with the swarm) at a cost that does not depend on the swarm's size.
const (
	MaxWatchers = 32
	maxWatches  = 512
)

// Timing of a watch.
const (
	// watchEvery coalesces bursts: at most one message per this.
	watchEvery = 50 * time.Millisecond
	// watchRecheck re-reads the blob's state when nothing changed for
	// this long (a fill that ended without completing closes no channel).
	watchRecheck = 10 * time.Second
)

// watchers counts the watches a server keeps, per blob.
type watchers struct {
	mu     sync.Mutex
	total  int
	byBlob map[string]int
}

func (w *watchers) add(digest string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.byBlob == nil {
		w.byBlob = map[string]int{}
	}
	if w.total >= maxWatches || w.byBlob[digest] >= MaxWatchers {
		return false
	}
	w.total++
	w.byBlob[digest]++
	return true
}

func (w *watchers) drop(digest string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.total--
	if w.byBlob[digest]--; w.byBlob[digest] == 0 {
		delete(w.byBlob, digest)
	}
}

// handleWatch streams this store's bitmap of one blob to the watcher each
// time it grows, until the blob is complete here (the last message says
// so), the blob is gone, or the watcher goes away.
func (s *Server) handleWatch(st network.Stream) {
	defer st.Close()
	_ = st.SetReadDeadline(time.Now().Add(requestDeadline))
	w := &progressWriter{st: st, idle: s.writeIdle}
	var req swarmproto.WatchRequest
	if err := wire.ReadMsg(st, &req, swarmproto.MaxRequestBytes); err != nil {
		st.Reset()
		return
	}
	if err := req.Validate(); err != nil {
		_ = wire.WriteMsg(w, swarmproto.WatchNews{Error: err.Error()})
		return
	}
	if !s.watches.add(req.Digest) {
		_ = wire.WriteMsg(w, swarmproto.WatchNews{Error: busyMsg})
		return
	}
	defer s.watches.drop(req.Digest)
	var sent []byte
	for {
		have, changed, ok := s.store.HaveWatch(req.Digest, req.PieceSize)
		if !ok {
			_ = wire.WriteMsg(w, swarmproto.WatchNews{Error: unavailableMsg})
			return
		}
		if sent == nil || !bytes.Equal(have, sent) {
			if err := wire.WriteMsg(w, swarmproto.WatchNews{Have: have}); err != nil {
				st.Reset()
				return
			}
			sent = have
		}
		if changed == nil {
			return // complete: nothing more to tell
		}
		recheck := time.NewTimer(watchRecheck)
		select {
		case <-changed:
		case <-recheck.C:
		}
		recheck.Stop()
		// Let a burst of pieces land before the next message.
		time.Sleep(watchEvery)
	}
}

// Watch streams peer p's bitmap of a blob to fn, at once and then each
// time it grows, until p holds the whole blob (nil error), ctx ends, or
// the stream breaks. A peer with too many watchers answers ErrBusy, one
// without the blob ErrUnavailable.
func Watch(ctx context.Context, h host.Host, p peer.ID, req swarmproto.WatchRequest, count int, fn func(have []byte)) error {
	st, err := h.NewStream(ctx, p, swarmproto.WatchProtocol)
	if err != nil {
		return fmt.Errorf("open watch stream to %s: %w", p, err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	if err := wire.WriteMsg(st, req); err != nil {
		st.Reset()
		return fmt.Errorf("watch %s on %s: %w", req.Digest, p, err)
	}
	if err := st.CloseWrite(); err != nil {
		st.Reset()
		return fmt.Errorf("watch %s on %s: %w", req.Digest, p, err)
	}
	full := (count + 7) / 8
	for {
		var news swarmproto.WatchNews
		if err := wire.ReadMsg(st, &news, maxHeaderBytes); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("watch %s on %s: %w", req.Digest, p, err)
		}
		switch news.Error {
		case "":
		case busyMsg:
			return fmt.Errorf("watch %s on %s: %w", req.Digest, p, ErrBusy)
		case unavailableMsg:
			return fmt.Errorf("watch %s on %s: %w", req.Digest, p, ErrUnavailable)
		default:
			return fmt.Errorf("watch %s on %s: %s", req.Digest, p, news.Error)
		}
		if len(news.Have) != full {
			st.Reset()
			return fmt.Errorf("watch %s on %s: bitmap of %d bytes, want %d", req.Digest, p, len(news.Have), full)
		}
		fn(news.Have)
		if complete(news.Have, count) {
			return nil
		}
	}
}

// complete reports whether have holds all count pieces.
func complete(have []byte, count int) bool {
	for i := range count {
		if have[i/8]&(0x80>>(i%8)) == 0 {
			return false
		}
	}
	return true
}
