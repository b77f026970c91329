package swarm

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/agent/blobcache"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/registryproxy"
)

// download drives one blob's swarm download: it runs the policy (Sched)
// against the wall clock, the tracker and the piece fetches, each fetch in
// its own goroutine.
type download struct {
	s     *Swarm
	tr    *trackerClient
	req   registryproxy.BlobRequest
	p     PieceStore
	count int
	sched *Sched
	src   *blobcache.Sources // this fill's byte split (nil: not counted)

	cids     []cid.Cid
	lastData atomic.Int64 // unix nanos of the last piece bytes received
	starved  atomic.Bool  // read by the poll loop

	failedMu sync.Mutex
	failed   []swarmproto.Failure // for the next tracker request
}

type result struct {
	f    Fetch
	data []byte
	have []byte // the peer's bitmap from its answer
	buf  []byte
	err  error
}

type permitAnswer struct {
	granted bool
	lease   time.Duration
	err     error
}

// news is a watched peer's bitmap, or the end of its watch.
type news struct {
	from peer.ID
	have []byte
	end  bool
	err  error
}

type update struct {
	resp *swarmproto.TrackerResponse
	err  error
}

func newDownload(s *Swarm, tr *trackerClient, req registryproxy.BlobRequest, p PieceStore) *download {
	cfg := SchedConfig{MaxInflight: s.cfg.MaxInflight, PerPeer: s.cfg.PerPeer, StallTimeout: s.cfg.StallTimeout}
	return &download{
		s: s, tr: tr, req: req, p: p, count: piece.Count(p.Size(), p.PieceSize()),
		sched: NewSched(cfg, s.host.ID(), p.Size(), p.PieceSize(), s.newRand(), s.clock.Now()),
	}
}

// run downloads until every piece is here. It returns *errFallback when the
// swarm cannot finish, after cancelling and waiting for its transfers.
func (d *download) run(ctx context.Context, first *swarmproto.TrackerResponse) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	results := make(chan result, d.s.cfg.MaxInflight)
	defer func() {
		cancel()
		wg.Wait()
		// Hand the buffers of abandoned transfers back to the pool.
		for {
			select {
			case r := <-results:
				d.s.bufs <- r.buf
			default:
				return
			}
		}
	}()
	if err := d.merge(first); err != nil {
		return &errFallback{reason: err.Error()}
	}

	updates := make(chan update, 1)
	announce := make(chan struct{}, 1)
	wg.Add(2)
	go func() { defer wg.Done(); d.pollLoop(ctx, updates) }()
	go func() { defer wg.Done(); d.announceLoop(ctx, announce) }()

	permits := make(chan permitAnswer, 1)
	asking := false // a permit request is out
	watched := make(chan news, DefaultWatch)
	tick := d.s.clock.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		have := d.p.Have()
		if have.Complete() {
			return nil
		}
		d.schedule(ctx, &wg, results, &have)
		d.watch(ctx, &wg, watched)
		d.starved.Store(d.sched.Starved(d.s.clock.Now()))
		changed := d.p.Changed()
		select {
		case n := <-watched:
			// Take in all the news there is before scheduling again.
			for more := true; more; {
				d.takeNews(ctx, n)
				select {
				case n = <-watched:
				default:
					more = false
				}
			}
		case u := <-updates:
			if u.err != nil {
				return &errFallback{reason: "tracker: " + u.err.Error(), trackerLost: true}
			}
			if err := d.merge(u.resp); err != nil {
				return &errFallback{reason: err.Error()}
			}
		case r := <-results:
			if err := d.finish(r); err != nil {
				return err
			}
			d.queueFailures()
			select {
			case announce <- struct{}{}:
			default:
			}
		case <-changed: // a reader moved, or a piece landed
		case <-tick.C():
			now := d.s.clock.Now()
			d.sched.SawData(time.Unix(0, d.lastData.Load()))
			if !asking && d.sched.Stalled(now) {
				// Only a few agents per blob may go to the registry at once:
				// ask the owning supernode; refused, stay with the swarm. The
				// answer may take long (a starved supernode): the download
				// goes on meanwhile.
				asking = true
				wg.Add(1)
				go func() {
					defer wg.Done()
					var a permitAnswer
					a.granted, a.lease, a.err = d.tr.permit(ctx)
					permits <- a
				}()
			}
		case a := <-permits:
			asking = false
			now := d.s.clock.Now()
			d.sched.SawData(time.Unix(0, d.lastData.Load()))
			switch {
			case a.err != nil && ctx.Err() != nil:
				return ctx.Err()
			case a.err != nil:
				return &errFallback{reason: "stalled, and the supernode did not answer a permit request: " + a.err.Error(), trackerLost: true}
			case a.granted && d.sched.Stalled(now):
				return &errFallback{reason: "no piece completed in " + d.s.cfg.StallTimeout.String(), stalled: true, permit: true, lease: a.lease}
			case a.granted:
				// The swarm moved while the supernode answered: hand the
				// permit back and stay.
				d.s.log.Info("swarm moved while a back-to-source permit was granted; handing it back", zap.String("digest", d.req.Digest))
				wg.Add(1)
				go func() { defer wg.Done(); d.s.release(d.tr) }()
			default:
				d.sched.Denied(now)
				d.s.log.Info("swarm stalled, but no back-to-source permit is free; staying with the swarm", zap.String("digest", d.req.Digest))
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// merge takes in a tracker response: new piece CIDs and peers.
func (d *download) merge(resp *swarmproto.TrackerResponse) error {
	cids, err := cidsFrom(resp.Pieces)
	if err != nil {
		return err
	}
	fresh, err := d.sched.Tracker(d.s.clock.Now(), resp)
	if err != nil {
		return err
	}
	d.cids = append(d.cids, cids...)
	for _, p := range fresh {
		d.s.host.Peerstore().AddAddrs(p.ID, swarmproto.ParseAddrs(p.Addrs), 10*time.Minute)
	}
	return nil
}

// takeNews takes in one watched peer's bitmap, or the end of its watch.
func (d *download) takeNews(ctx context.Context, n news) {
	if !n.end {
		d.s.watchNews.Add(1)
		d.sched.PeerHave(n.from, n.have)
		return
	}
	d.sched.Unwatched(n.from)
	if n.err != nil && ctx.Err() == nil {
		d.s.log.Debug("watch ended", zap.String("digest", d.req.Digest), zap.Stringer("peer", n.from), zap.Error(n.err))
	}
}

// watch starts watching the peers the policy picks: each watch hands the
// peer's bitmaps to the download's loop until it ends.
func (d *download) watch(ctx context.Context, wg *sync.WaitGroup, out chan<- news) {
	for {
		id, ok := d.sched.Watch()
		if !ok {
			return
		}
		req := swarmproto.WatchRequest{Digest: d.req.Digest, PieceSize: d.p.PieceSize()}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := d.s.fetcher.Watch(ctx, id, req, d.count, func(have []byte) {
				select {
				case out <- news{from: id, have: have}:
				case <-ctx.Done():
				}
			})
			select {
			case out <- news{from: id, end: true, err: err}:
			case <-ctx.Done():
			}
		}()
	}
}

// sawData records that piece bytes are arriving (called from transfers).
func (d *download) sawData(int) { d.lastData.Store(d.s.clock.Now().UnixNano()) }

// minPollInterval keeps N agents' long-polls from turning every piece
// completion into N immediate round trips.
const minPollInterval = 100 * time.Millisecond

// pollLoop polls the tracker; repeated failures end the swarm (late
// answers from a supernode still connected are not failures).
func (d *download) pollLoop(ctx context.Context, updates chan<- update) {
	failures := 0
	known := len(d.cids)
	pace := time.NewTimer(0)
	defer pace.Stop()
	for ctx.Err() == nil {
		select {
		case <-pace.C:
		case <-ctx.Done():
			return
		}
		pace.Reset(minPollInterval)
		have := d.p.Have()
		resp, err := d.tr.poll(ctx, known, have.Bytes(), d.starved.Load(), d.p.Waiting(), d.takeFailed())
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if d.tr.slow(err) {
				// Connected and answering, late: the download goes on with the
				// peers it knows (a stall still asks for a permit).
				d.s.log.Debug("tracker answers late; polling again", zap.String("digest", d.req.Digest), zap.Error(err))
				continue
			}
			if failures++; failures < 3 {
				continue
			}
		} else {
			failures = 0
			known += len(resp.Pieces)
		}
		select {
		case updates <- update{resp: resp, err: err}:
		case <-ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// queueFailures moves the scheduler's failure reports to the queue the
// tracker requests drain (they run on other goroutines than the Sched).
func (d *download) queueFailures() {
	fs := d.sched.Failures()
	if len(fs) == 0 {
		return
	}
	d.failedMu.Lock()
	defer d.failedMu.Unlock()
	for _, f := range fs {
		if len(d.failed) < swarmproto.MaxFailed {
			d.failed = append(d.failed, swarmproto.Failure{Peer: f.Peer.String(), Piece: f.Piece, Corrupt: f.Corrupt})
		}
	}
}

// takeFailed hands the queued failure reports to a tracker request.
func (d *download) takeFailed() []swarmproto.Failure {
	d.failedMu.Lock()
	defer d.failedMu.Unlock()
	out := d.failed
	d.failed = nil
	return out
}

// announceLoop tells the tracker about new pieces, coalescing bursts.
func (d *download) announceLoop(ctx context.Context, signal <-chan struct{}) {
	holder := false // announced a piece
	for {
		select {
		case <-signal:
		case <-ctx.Done():
			return
		}
		have := d.p.Have()
		first := !holder && have.Count() > 0
		holder = holder || first
		if err := d.tr.have(ctx, have.Bytes(), d.takeFailed(), first); err != nil && ctx.Err() == nil {
			d.s.log.Debug("announce pieces", zap.String("digest", d.req.Digest), zap.Error(err))
		}
	}
}

// announceFinal reports the complete blob, so peers keep coming to us.
func (d *download) announceFinal() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	all := piece.NewBitmap(d.count)
	for i := range d.count {
		all.Set(i)
	}
	if err := d.tr.haveNow(ctx, all.Bytes()); err != nil {
		d.s.log.Debug("announce complete blob", zap.String("digest", d.req.Digest), zap.Error(err))
	}
}

// schedule starts downloads while there is room.
func (d *download) schedule(ctx context.Context, wg *sync.WaitGroup, results chan<- result, have *piece.Bitmap) {
	now := d.s.clock.Now()
	for {
		f, ok := d.sched.Next(now, have, d.p.Waiting())
		if !ok {
			return
		}
		var buf []byte
		select {
		case buf = <-d.s.bufs:
		default:
			// Every piece buffer of the agent is in use by other blobs:
			// waiting for one is not a stall.
			d.sched.Waited(now)
			return
		}
		if int64(cap(buf)) < d.p.PieceSize() {
			buf = make([]byte, d.p.PieceSize())
		}
		d.sched.Start(f)
		_, length := piece.Bounds(f.Piece, d.p.Size(), d.p.PieceSize())
		req := swarmproto.PieceRequest{Digest: d.req.Digest, PieceSize: d.p.PieceSize(), Index: f.Piece}
		c := d.cids[f.Piece]
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A peer that trickles bytes keeps the swarm from looking stalled,
			// so each transfer has its own deadline: a generous floor rate.
			fctx, cancel := context.WithTimeout(ctx, 30*time.Second+time.Duration(length/(64<<10))*time.Second)
			data, have, err := d.s.fetcher.Fetch(fctx, f.From, req, length, c, buf, d.sawData)
			cancel()
			results <- result{f: f, data: data, have: have, buf: buf, err: err}
		}()
	}
}

// finish handles one piece transfer's outcome.
func (d *download) finish(r result) error {
	defer func() { d.s.bufs <- r.buf }()
	if r.have != nil {
		defer d.sched.PeerHave(r.f.From, r.have)
	}
	now := d.s.clock.Now()
	switch {
	case r.err == nil:
		if d.p.Have().Has(r.f.Piece) {
			d.sched.Done(now, r.f, Dup) // the endgame twin got here first
			return nil
		}
		if err := d.p.WritePiece(r.f.Piece, r.data); err != nil {
			d.sched.Done(now, r.f, Dup) // the store failed, not the peer
			return err
		}
		d.sched.Done(now, r.f, Got)
		if d.sched.peers[r.f.From].seed {
			d.s.fromSeed.Add(int64(len(r.data)))
			d.src.AddSeed(int64(len(r.data)))
		} else {
			d.s.fromPeers.Add(int64(len(r.data)))
			d.src.AddPeers(int64(len(r.data)))
		}
	case errors.Is(r.err, pieceserver.ErrCorrupt):
		d.sched.Done(now, r.f, Corrupt)
		if d.s.cfg.OnCorrupt != nil {
			d.s.cfg.OnCorrupt()
		}
		d.s.log.Warn("peer sent a corrupt piece; dropping it for this blob", zap.String("peer", r.f.From.String()),
			zap.String("digest", d.req.Digest), zap.Int("piece", r.f.Piece), zap.Error(r.err))
	case errors.Is(r.err, pieceserver.ErrBusy):
		d.sched.Done(now, r.f, Busy)
	case errors.Is(r.err, pieceserver.ErrUnavailable):
		d.sched.Done(now, r.f, Unavailable)
	default:
		d.sched.Done(now, r.f, Failed)
		if d.sched.Banned(r.f.From) {
			d.s.log.Info("peer keeps failing; dropping it for this blob", zap.String("peer", r.f.From.String()),
				zap.String("digest", d.req.Digest), zap.Error(r.err))
		}
	}
	return nil
}
