package swarm

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// The seams of a swarm download. Only thin drivers touch libp2p, the
// store's files and the wall clock; each seam has an in-memory twin (for
// tests and the simulator) that passes the same conformance test.

// Clock tells the time and ticks.
type Clock interface {
	Now() time.Time
	// NewTicker ticks every d until stopped; like time.Ticker it drops
	// ticks a slow reader misses.
	NewTicker(d time.Duration) Ticker
}

// Ticker is a Clock's ticker.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// WallClock is the real clock.
type WallClock struct{}

var _ Clock = WallClock{}

// Now implements Clock.
func (WallClock) Now() time.Time { return time.Now() }

// NewTicker implements Clock.
func (WallClock) NewTicker(d time.Duration) Ticker { return wallTicker{time.NewTicker(d)} }

type wallTicker struct{ t *time.Ticker }

func (w wallTicker) C() <-chan time.Time { return w.t.C }
func (w wallTicker) Stop()               { w.t.Stop() }

// ManualClock is a Clock that moves only when told to (Advance).
type ManualClock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*manualTicker
}

var _ Clock = (*ManualClock)(nil)

// NewManualClock returns a clock reading start.
func NewManualClock(start time.Time) *ManualClock { return &ManualClock{now: start} }

// Now implements Clock.
func (m *ManualClock) Now() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.now
}

// NewTicker implements Clock.
func (m *ManualClock) NewTicker(d time.Duration) Ticker {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := &manualTicker{c: make(chan time.Time, 1), every: d, next: m.now.Add(d), clock: m}
	m.tickers = append(m.tickers, t)
	return t
}

// Advance moves the clock by d, firing the tickers that come due.
func (m *ManualClock) Advance(d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.now = m.now.Add(d)
	for _, t := range m.tickers {
		if t.every <= 0 {
			continue // never fires
		}
		fired := false
		for !t.next.After(m.now) {
			if !fired {
				select {
				case t.c <- t.next:
				default: // dropped, as time.Ticker drops
				}
				fired = true
			}
			t.next = t.next.Add(t.every)
		}
	}
}

type manualTicker struct {
	c     chan time.Time
	every time.Duration
	next  time.Time
	clock *ManualClock
}

func (t *manualTicker) C() <-chan time.Time { return t.c }

func (t *manualTicker) Stop() {
	m := t.clock
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, x := range m.tickers {
		if x == t {
			m.tickers = append(m.tickers[:k], m.tickers[k+1:]...)
			return
		}
	}
}

// PieceStore is where a download puts verified pieces: *store.Partial, or
// a MemPartial.
type PieceStore interface {
	Size() int64
	PieceSize() int64
	// Have returns a copy of the stored-piece bitmap.
	Have() piece.Bitmap
	// Waiting is the lowest piece a reader is blocked on, or -1.
	Waiting() int
	// Changed is closed at the next change.
	Changed() <-chan struct{}
	// WritePiece stores piece i, which the caller verified.
	WritePiece(i int, data []byte) error
}

var (
	_ PieceStore = (*store.Partial)(nil)
	_ PieceStore = (*MemPartial)(nil)
)

// MemPartial is a PieceStore in memory. With keep false it holds no
// payload, only which pieces arrived (the simulator's thousands of nodes);
// with readInOrder it behaves as if a client streamed the blob from the
// start, always blocked on the first missing piece.
type MemPartial struct {
	size, pieceSize int64
	keep            bool
	readInOrder     bool

	mu      sync.Mutex
	have    piece.Bitmap
	data    map[int][]byte
	changed chan struct{}
}

// NewMemPartial returns an empty in-memory partial blob.
func NewMemPartial(size, pieceSize int64, keep, readInOrder bool) *MemPartial {
	return &MemPartial{
		size: size, pieceSize: pieceSize, keep: keep, readInOrder: readInOrder,
		have: piece.NewBitmap(piece.Count(size, pieceSize)), data: map[int][]byte{}, changed: make(chan struct{}),
	}
}

// Size implements PieceStore.
func (m *MemPartial) Size() int64 { return m.size }

// PieceSize implements PieceStore.
func (m *MemPartial) PieceSize() int64 { return m.pieceSize }

// Have implements PieceStore.
func (m *MemPartial) Have() piece.Bitmap {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.have.Clone()
}

// Waiting implements PieceStore.
func (m *MemPartial) Waiting() int {
	if !m.readInOrder {
		return -1
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.have.Len() {
		if !m.have.Has(i) {
			return i
		}
	}
	return -1
}

// Changed implements PieceStore.
func (m *MemPartial) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// WritePiece implements PieceStore.
func (m *MemPartial) WritePiece(i int, data []byte) error {
	if i < 0 || i >= m.have.Len() {
		return fmt.Errorf("write piece %d of %d", i, m.have.Len())
	}
	if _, length := piece.Bounds(i, m.size, m.pieceSize); int64(len(data)) != length {
		return fmt.Errorf("write piece %d: %d bytes, want %d", i, len(data), length)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.keep {
		m.data[i] = append([]byte(nil), data...)
	}
	m.have.Set(i)
	close(m.changed)
	m.changed = make(chan struct{})
	return nil
}

// Has reports whether piece i is stored.
func (m *MemPartial) Has(i int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.have.Has(i)
}

// Piece returns a stored piece's bytes (nil when the partial keeps none).
func (m *MemPartial) Piece(i int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.data[i]
}

// PieceFetcher downloads one piece from a peer into buf and verifies it
// against c, returning pieceserver's ErrBusy, ErrUnavailable or ErrCorrupt
// (wrapped) for those answers. onData hears of bytes as they arrive. have
// is the peer's current bitmap of the blob when its answer carried one
// (whatever the outcome), nil otherwise.
//
// Watch hands fn the peer's bitmap of a blob of count pieces, at once and
// each time it grows, until the peer holds the whole blob (nil error), ctx
// ends, or the peer will not or cannot (ErrBusy: too many watchers).
type PieceFetcher interface {
	Fetch(ctx context.Context, from peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, onData func(int)) (data, have []byte, err error)
	Watch(ctx context.Context, from peer.ID, req swarmproto.WatchRequest, count int, fn func(have []byte)) error
}

// HostFetcher fetches pieces over libp2p.
type HostFetcher struct {
	Host     host.Host
	Download *ratelimit.Limiter // nil: unlimited
}

var _ PieceFetcher = HostFetcher{}

// Fetch implements PieceFetcher.
func (h HostFetcher) Fetch(ctx context.Context, from peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, onData func(int)) (data, have []byte, err error) {
	return pieceserver.FetchHave(ctx, h.Host, from, req, length, c, buf, h.Download, onData)
}

// Watch implements PieceFetcher.
func (h HostFetcher) Watch(ctx context.Context, from peer.ID, req swarmproto.WatchRequest, count int, fn func(have []byte)) error {
	return pieceserver.Watch(ctx, h.Host, from, req, count, fn)
}

// MemFetcher fetches pieces from in-memory peers.
type MemFetcher struct {
	mu    sync.Mutex
	peers map[peer.ID]map[string]*MemPartial // peer -> digest -> its pieces
}

var _ PieceFetcher = (*MemFetcher)(nil)

// NewMemFetcher returns a fetcher that knows no peers.
func NewMemFetcher() *MemFetcher { return &MemFetcher{peers: map[peer.ID]map[string]*MemPartial{}} }

// Serve makes peer id serve blob digest from p (which must keep payload).
func (f *MemFetcher) Serve(id peer.ID, digest string, p *MemPartial) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.peers[id] == nil {
		f.peers[id] = map[string]*MemPartial{}
	}
	f.peers[id][digest] = p
}

// Watch implements PieceFetcher: a peer's MemPartial watched as the
// piece server watches its store (without its bounds on watchers).
func (f *MemFetcher) Watch(ctx context.Context, from peer.ID, req swarmproto.WatchRequest, count int, fn func(have []byte)) error {
	f.mu.Lock()
	blobs, ok := f.peers[from]
	p := blobs[req.Digest]
	f.mu.Unlock()
	switch {
	case !ok:
		return fmt.Errorf("open watch stream to %s: no such peer", from)
	case p == nil || p.PieceSize() != req.PieceSize:
		return fmt.Errorf("watch %s on %s: %w", req.Digest, from, pieceserver.ErrUnavailable)
	}
	for {
		changed := p.Changed()
		have := p.Have()
		fn(have.Bytes())
		if have.Complete() {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Fetch implements PieceFetcher.
func (f *MemFetcher) Fetch(ctx context.Context, from peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, onData func(int)) (data, have []byte, err error) {
	if int64(len(buf)) < length {
		return nil, nil, fmt.Errorf("fetch piece %d: buffer of %d bytes for %d", req.Index, len(buf), length)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, fmt.Errorf("fetch piece %d from %s: %w", req.Index, from, err)
	}
	f.mu.Lock()
	blobs, ok := f.peers[from]
	p := blobs[req.Digest]
	f.mu.Unlock()
	if !ok {
		return nil, nil, fmt.Errorf("open piece stream to %s: no such peer", from)
	}
	if p != nil && p.PieceSize() == req.PieceSize {
		b := p.Have()
		have = b.Bytes()
	}
	if have == nil || !p.Has(req.Index) {
		return nil, have, fmt.Errorf("piece %d from %s: %w", req.Index, from, pieceserver.ErrUnavailable)
	}
	src := p.Piece(req.Index)
	if int64(len(src)) != length {
		return nil, have, fmt.Errorf("piece %d from %s: %d bytes, want %d: %w", req.Index, from, len(src), length, pieceserver.ErrCorrupt)
	}
	data = buf[:length]
	copy(data, src)
	if onData != nil {
		onData(len(data))
	}
	if err := piece.Verify(c, data); err != nil {
		return nil, have, fmt.Errorf("piece %d of %s from %s: %w: %w", req.Index, req.Digest, from, pieceserver.ErrCorrupt, err)
	}
	return data, have, nil
}
