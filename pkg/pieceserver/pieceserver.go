// Package pieceserver serves blob pieces to peers over /starling/piece/1
// and fetches pieces from them, verifying each against its CID.
package pieceserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/ratelimit"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// ErrBusy means the peer is at its upload cap; try another.
var ErrBusy = errors.New("peer busy")

// ErrCorrupt means a peer sent bytes that do not match the piece CID.
var ErrCorrupt = errors.New("corrupt piece")

// ErrUnavailable means the peer does not have the piece (yet).
var ErrUnavailable = errors.New("piece not available")

// Answers with a meaning for the client.
const (
	busyMsg        = "busy"
	unavailableMsg = "piece not available"
)

// copyBuf is the size of an upload slot's copy buffer: each read of the
// file and each write to the stream moves this much, so a 4 MiB piece is
// 16 reads and 16 muxer frames rather than 128 of each with io.Copy's
// 32 KiB.
const copyBuf = 256 << 10

// Server answers piece requests from the local store.
type Server struct {
	store  *store.Store
	upload *ratelimit.Limiter
	slots  chan []byte // an upload slot is its copy buffer (nil until first used)
	// extra are the slots past maxUploads an underused upload may take
	// (Admit); each is a copy buffer too.
	extra chan []byte
	// waiting counts requests waiting for a slot (Admit bounds them).
	waiting atomic.Int64
	meterMu sync.Mutex
	meter   Meter
	watches watchers
	log     *zap.Logger
	served  atomic.Int64
	// writeIdle is how long one write to a peer may block: a peer that
	// stops reading frees its upload slot after this, whatever the
	// piece's size (a deadline per write, not per transfer).
	writeIdle time.Duration
}

// Deadlines of a piece stream.
const (
	requestDeadline  = 30 * time.Second
	defaultWriteIdle = 15 * time.Second
)

// NewServer builds a Server allowing maxUploads concurrent uploads, paced
// by upload (nil: unlimited).
func NewServer(st *store.Store, upload *ratelimit.Limiter, maxUploads int, log *zap.Logger) *Server {
	if maxUploads <= 0 {
		maxUploads = 8
	}
	slots := make(chan []byte, maxUploads)
	extra := make(chan []byte, (elastic-1)*maxUploads)
	for range maxUploads {
		slots <- nil
	}
	for range cap(extra) {
		extra <- nil
	}
	return &Server{store: st, upload: upload, slots: slots, extra: extra, log: log, writeIdle: defaultWriteIdle,
		meter: Meter{Cap: upload.Rate()}}
}

// Register installs the piece protocol's handler on h.
func (s *Server) Register(h host.Host) { h.SetStreamHandler(swarmproto.PieceProtocol, s.handle) }

// RegisterWatch installs the watch protocol's handler on h (agents: their
// neighbours watch their bitmaps; a seed's pieces are the tracker's to offer).
func (s *Server) RegisterWatch(h host.Host) {
	h.SetStreamHandler(swarmproto.WatchProtocol, s.handleWatch)
}

// BytesServed returns the piece bytes uploaded so far.
func (s *Server) BytesServed() int64 { return s.served.Load() }

func (s *Server) handle(st network.Stream) {
	defer st.Close()
	_ = st.SetReadDeadline(time.Now().Add(requestDeadline))
	w := &progressWriter{st: st, idle: s.writeIdle}
	var req swarmproto.PieceRequest
	if err := wire.ReadMsg(st, &req, swarmproto.MaxRequestBytes); err != nil {
		st.Reset()
		return
	}
	if err := req.Validate(); err != nil {
		_ = wire.WriteMsg(w, swarmproto.PieceHeader{Error: err.Error()})
		return
	}
	buf, pool, ok := s.slot()
	if !ok {
		_ = wire.WriteMsg(w, swarmproto.PieceHeader{Error: busyMsg, Have: s.have(&req)})
		return
	}
	if buf == nil {
		buf = make([]byte, copyBuf)
	}
	defer func() { pool <- buf }()
	r, n, err := s.store.PieceReader(req.Digest, req.Index, req.PieceSize)
	if err != nil {
		_ = wire.WriteMsg(w, swarmproto.PieceHeader{Error: unavailableMsg, Have: s.have(&req)})
		return
	}
	defer r.Close()
	if err := wire.WriteMsg(w, swarmproto.PieceHeader{Size: n, Have: s.have(&req)}); err != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err = io.CopyBuffer(s.upload.Writer(ctx, countingWriter{w: w, n: &s.served}), r, buf)
	if err != nil {
		s.log.Debug("piece upload cut short", zap.String("peer", st.Conn().RemotePeer().String()),
			zap.String("digest", req.Digest), zap.Int("piece", req.Index), zap.Error(err))
		st.Reset()
	}
}

// elastic is how many times its slots an underused server may serve at
// once (Admit).
const elastic = 2

// slot takes an upload slot as Admit rules: at once if one is free or the
// upload is underused, else after a wait of at most QueueWait if few
// enough requests wait already. It returns the slot's copy buffer (nil
// until first used) and the pool it goes back to, or false.
func (s *Server) slot() ([]byte, chan []byte, bool) {
	select {
	case buf := <-s.slots:
		return buf, s.slots, true
	default:
	}
	n := cap(s.slots)
	busy := n + cap(s.extra) - len(s.extra)
	waiting := s.waiting.Add(1) - 1
	switch Admit(n, busy, int(waiting), s.underused()) {
	case Serve:
		select {
		case buf := <-s.extra:
			s.waiting.Add(-1)
			s.meterMu.Lock()
			s.meter.Took()
			s.meterMu.Unlock()
			return buf, s.extra, true
		default: // taken meanwhile: wait as any other
		}
	case Refuse:
		s.waiting.Add(-1)
		return nil, nil, false
	}
	defer s.waiting.Add(-1)
	wait := time.NewTimer(QueueWait)
	defer wait.Stop()
	select {
	case buf := <-s.slots:
		return buf, s.slots, true
	case <-wait.C:
		return nil, nil, false
	}
}

// underused reports whether the upload runs below what the link has
// shown it can carry (Meter).
func (s *Server) underused() bool {
	s.meterMu.Lock()
	defer s.meterMu.Unlock()
	return s.meter.Underused(time.Now(), s.served.Load())
}

// countingWriter adds every byte written to n, as it goes (the Meter
// needs the upload's rate, not a sum per piece).
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	k, err := c.w.Write(b)
	c.n.Add(int64(k))
	return k, err
}

// progressWriter gives each write to the stream idle to complete (the
// deadline is set right before the write, after any rate-limit wait).
type progressWriter struct {
	st   network.Stream
	idle time.Duration
}

func (p *progressWriter) Write(b []byte) (int, error) {
	_ = p.st.SetWriteDeadline(time.Now().Add(p.idle))
	return p.st.Write(b)
}

// maxHeaderBytes caps a piece answer's header: a bitmap of the largest
// blob (swarmproto's piece limit), base64 in JSON, and room to spare.
const maxHeaderBytes = 256 << 10

// have is this server's bitmap of the requested blob, for the answer.
func (s *Server) have(req *swarmproto.PieceRequest) []byte {
	b, _ := s.store.HaveBitmap(req.Digest, req.PieceSize)
	return b
}

// Fetch is FetchHave without the server's bitmap.
func Fetch(ctx context.Context, h host.Host, p peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, down *ratelimit.Limiter, onData func(n int)) ([]byte, error) {
	data, _, err := FetchHave(ctx, h, p, req, length, c, buf, down, onData)
	return data, err
}

// FetchHave downloads piece req.Index of length want from peer p into buf and
// verifies it against c. buf must hold at least the piece's length.
// onData, if not nil, hears of every chunk of bytes as it arrives, so a
// caller can tell a slow transfer from a dead one.
// It also returns the server's current bitmap of the blob when the answer
// carried one (nil otherwise), whatever the outcome.
func FetchHave(ctx context.Context, h host.Host, p peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, down *ratelimit.Limiter, onData func(n int)) (data, have []byte, err error) {
	data, err = fetch(ctx, h, p, req, length, c, buf, down, onData, &have)
	return data, have, err
}

func fetch(ctx context.Context, h host.Host, p peer.ID, req swarmproto.PieceRequest, length int64, c cid.Cid, buf []byte, down *ratelimit.Limiter, onData func(n int), have *[]byte) ([]byte, error) {
	if int64(len(buf)) < length {
		return nil, fmt.Errorf("fetch piece %d: buffer of %d bytes for %d", req.Index, len(buf), length)
	}
	st, err := h.NewStream(ctx, p, swarmproto.PieceProtocol)
	if err != nil {
		return nil, fmt.Errorf("open piece stream to %s: %w", p, err)
	}
	defer st.Close()
	// A stream does not watch the context; reset it when ctx ends.
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	if err := wire.WriteMsg(st, req); err != nil {
		st.Reset()
		return nil, fmt.Errorf("request piece %d from %s: %w", req.Index, p, err)
	}
	if err := st.CloseWrite(); err != nil {
		st.Reset()
		return nil, fmt.Errorf("request piece %d from %s: %w", req.Index, p, err)
	}
	var hdr swarmproto.PieceHeader
	if err := wire.ReadMsg(st, &hdr, maxHeaderBytes); err != nil {
		st.Reset()
		return nil, fmt.Errorf("read piece %d header from %s: %w", req.Index, p, err)
	}
	*have = hdr.Have
	if hdr.Error == busyMsg {
		return nil, fmt.Errorf("piece %d from %s: %w", req.Index, p, ErrBusy)
	}
	if hdr.Error == unavailableMsg {
		return nil, fmt.Errorf("piece %d from %s: %w", req.Index, p, ErrUnavailable)
	}
	if hdr.Error != "" {
		return nil, fmt.Errorf("piece %d from %s: %s", req.Index, p, hdr.Error)
	}
	if hdr.Size != length {
		st.Reset()
		return nil, fmt.Errorf("piece %d from %s: %d bytes, want %d: %w", req.Index, p, hdr.Size, length, ErrCorrupt)
	}
	data := buf[:length]
	var body io.Reader = down.Reader(ctx, st)
	if onData != nil {
		body = progressReader{r: body, onData: onData}
	}
	if _, err := io.ReadFull(body, data); err != nil {
		st.Reset()
		return nil, fmt.Errorf("read piece %d from %s: %w", req.Index, p, err)
	}
	if err := piece.Verify(c, data); err != nil {
		return nil, fmt.Errorf("piece %d of %s from %s: %w: %w", req.Index, req.Digest, p, ErrCorrupt, err)
	}
	return data, nil
}

type progressReader struct {
	r      io.Reader
	onData func(int)
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.onData(n)
	}
	return n, err
}
