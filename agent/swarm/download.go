package swarm

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/registryproxy"
)

// download is the state of one blob's swarm download.
type download struct {
	s     *Swarm
	tr    *trackerClient
	req   registryproxy.BlobRequest
	p     *store.Partial
	count int

	cids       []cid.Cid
	version    uint64
	peers      map[peer.ID]*peerState
	inflight   map[int][]peer.ID // piece -> peers it is being fetched from
	running    int
	progress   time.Time
	order      []int        // a random permutation: ties in rarity break randomly
	idle       time.Time    // since when no missing piece had a known source (zero: has one)
	sourced    bool         // the last pick saw a missing piece that some known peer has
	lastData   atomic.Int64 // unix nanos of the last piece bytes received
	swarmMoved time.Time    // the last tracker news of progress anywhere in the swarm
	starved    atomic.Bool  // no source for too long: ask the tracker for all of the seed
}

type peerState struct {
	have     piece.Bitmap
	seed     bool
	inflight int
	failures int
	banned   bool
	cooldown time.Time
}

type result struct {
	i    int
	from peer.ID
	data []byte
	buf  []byte
	err  error
}

type update struct {
	resp *swarmproto.TrackerResponse
	err  error
}

func newDownload(s *Swarm, tr *trackerClient, req registryproxy.BlobRequest, p *store.Partial) *download {
	n := piece.Count(p.Size(), p.PieceSize())
	d := &download{
		s: s, tr: tr, req: req, p: p, count: n,
		peers: map[peer.ID]*peerState{}, inflight: map[int][]peer.ID{},
		order: rand.Perm(n),
	}
	return d
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
	d.progress = time.Now()

	updates := make(chan update, 1)
	announce := make(chan struct{}, 1)
	wg.Add(2)
	go func() { defer wg.Done(); d.pollLoop(ctx, updates) }()
	go func() { defer wg.Done(); d.announceLoop(ctx, announce) }()

	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		have := d.p.Have()
		if have.Complete() {
			return nil
		}
		d.schedule(ctx, &wg, results, &have)
		d.checkStarved()
		changed := d.p.Changed()
		select {
		case u := <-updates:
			if u.err != nil {
				return &errFallback{reason: "tracker: " + u.err.Error(), trackerLost: true}
			}
			if u.resp.Version > d.version {
				// The swarm moved (a peer or the seed got pieces): waiting
				// our turn behind a slow seed is not a stall.
				d.swarmMoved = time.Now()
			}
			if err := d.merge(u.resp); err != nil {
				return &errFallback{reason: err.Error()}
			}
		case r := <-results:
			if err := d.finish(r); err != nil {
				return err
			}
			select {
			case announce <- struct{}{}:
			default:
			}
		case <-changed: // a reader moved, or a piece landed
		case <-tick.C:
			if d.stalled() {
				return &errFallback{reason: "no piece completed in " + d.s.cfg.StallTimeout.String()}
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// merge takes in a tracker response: new piece CIDs and peers.
func (d *download) merge(resp *swarmproto.TrackerResponse) error {
	if resp.Size != d.p.Size() || resp.PieceSize != d.p.PieceSize() {
		return errors.New("seed restarted the blob with another geometry")
	}
	cids, err := cidsFrom(resp.Pieces)
	if err != nil {
		return err
	}
	d.cids = append(d.cids, cids...)
	d.version = resp.Version
	for _, info := range resp.Peers {
		id, err := peer.Decode(info.ID)
		if err != nil || id == d.s.host.ID() {
			continue
		}
		have, err := piece.BitmapFromBytes(d.count, info.Have)
		if err != nil {
			continue
		}
		ps, ok := d.peers[id]
		if !ok {
			ps = &peerState{}
			d.peers[id] = ps
			d.s.host.Peerstore().AddAddrs(id, swarmproto.ParseAddrs(info.Addrs), 10*time.Minute)
		}
		ps.have, ps.seed = have, info.Seed
	}
	return nil
}

// sawData records that piece bytes are arriving (called from transfers).
func (d *download) sawData(int) { d.lastData.Store(time.Now().UnixNano()) }

// stalled reports a download that for StallTimeout has completed no piece,
// received no byte, and heard of no progress anywhere in its swarm, while
// it had no source to wait on. A slow swarm (low bandwidth, busy peers, a
// seed still handing out the first pieces) is not stalled: going back to
// source then would multiply the registry's load, the very thing Starling
// avoids.
func (d *download) stalled() bool {
	last := d.progress
	if t := time.Unix(0, d.lastData.Load()); t.After(last) {
		last = t
	}
	if d.swarmMoved.After(last) {
		last = d.swarmMoved
	}
	if d.sourced && d.running == 0 {
		// Sources exist but are all busy or cooling down: that is contention.
		return false
	}
	return time.Since(last) > d.s.cfg.StallTimeout
}

// starveAfter is how long a download may go with nothing in flight and no
// known peer holding any piece it lacks (its sources are gone or banned)
// before it asks for everything the seed has. Busy peers are not starvation.
const starveAfter = time.Second

func (d *download) checkStarved() {
	switch {
	case d.running > 0 || d.sourced:
		d.idle = time.Time{}
		d.starved.Store(false)
	case d.idle.IsZero():
		d.idle = time.Now()
	case time.Since(d.idle) > starveAfter && time.Since(d.swarmMoved) > starveAfter:
		// No source and no news: our sources are gone or banned. (With
		// news, pieces are spreading and one will reach us.)
		d.starved.Store(true)
	}
}

// minPollInterval keeps N agents' long-polls from turning every piece
// completion into N immediate round trips.
const minPollInterval = 100 * time.Millisecond

// pollLoop long-polls the tracker; repeated failures end the swarm.
func (d *download) pollLoop(ctx context.Context, updates chan<- update) {
	failures := 0
	var since uint64
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
		resp, err := d.tr.poll(ctx, since, known, have.Bytes(), d.starved.Load(), d.p.Waiting())
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if failures++; failures < 3 {
				continue
			}
		} else {
			failures = 0
			since = resp.Version
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

// announceLoop tells the tracker about new pieces, coalescing bursts.
func (d *download) announceLoop(ctx context.Context, signal <-chan struct{}) {
	for {
		select {
		case <-signal:
		case <-ctx.Done():
			return
		}
		have := d.p.Have()
		if err := d.tr.have(ctx, have.Bytes()); err != nil && ctx.Err() == nil {
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
	if err := d.tr.have(ctx, all.Bytes()); err != nil {
		d.s.log.Debug("announce complete blob", zap.String("digest", d.req.Digest), zap.Error(err))
	}
}

// schedule starts downloads while there is room.
func (d *download) schedule(ctx context.Context, wg *sync.WaitGroup, results chan<- result, have *piece.Bitmap) {
	now := time.Now()
	for d.running < d.s.cfg.MaxInflight {
		i, from, ok := d.pick(have, now)
		if !ok {
			return
		}
		var buf []byte
		select {
		case buf = <-d.s.bufs:
		default:
			// Every piece buffer of the agent is in use by other blobs:
			// waiting for one is not a stall.
			d.progress = now
			return
		}
		if int64(cap(buf)) < d.p.PieceSize() {
			buf = make([]byte, d.p.PieceSize())
		}
		d.running++
		d.inflight[i] = append(d.inflight[i], from)
		d.peers[from].inflight++
		_, length := piece.Bounds(i, d.p.Size(), d.p.PieceSize())
		req := swarmproto.PieceRequest{Digest: d.req.Digest, PieceSize: d.p.PieceSize(), Index: i}
		c := d.cids[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A peer that trickles bytes keeps the swarm from looking stalled,
			// so each transfer has its own deadline: a generous floor rate.
			fctx, cancel := context.WithTimeout(ctx, 30*time.Second+time.Duration(length/(64<<10))*time.Second)
			data, err := pieceserver.Fetch(fctx, d.s.host, from, req, length, c, buf, d.s.cfg.Download, d.sawData)
			cancel()
			results <- result{i: i, from: from, data: data, buf: buf, err: err}
		}()
	}
}

// pick chooses the next piece and peer: first the pieces a blocked reader
// needs (so the HTTP response streams), then the rarest among peers; in
// the endgame, a piece already in flight from a different peer.
func (d *download) pick(have *piece.Bitmap, now time.Time) (int, peer.ID, bool) {
	known := len(d.cids)
	// The pieces a blocked reader needs come first, but only a few at a
	// time: when every client reads in order (a pull storm) the rest of the
	// slots go rarest-first, which is what spreads pieces fastest.
	if w := d.p.Waiting(); w >= 0 && w < known && d.readerSlots() < readerSlots {
		for i := w; i < min(known, w+readerSlots); i++ {
			if !have.Has(i) && len(d.inflight[i]) == 0 {
				if from, ok := d.peerFor(i, now); ok {
					return i, from, true
				}
			}
		}
	}
	best, bestFrom, bestRarity := -1, peer.ID(""), 0
	missing := 0
	d.sourced = false
	for _, i := range d.order {
		if i >= known || have.Has(i) {
			continue
		}
		missing++
		if len(d.inflight[i]) > 0 {
			continue
		}
		rarity := d.rarity(i)
		if rarity > 0 {
			d.sourced = true
		}
		if rarity == 0 || (best >= 0 && rarity >= bestRarity) {
			continue
		}
		if from, ok := d.peerFor(i, now); ok {
			best, bestFrom, bestRarity = i, from, rarity
		}
	}
	if best >= 0 {
		return best, bestFrom, true
	}
	// Endgame: every missing piece is in flight; race a second peer for
	// the stragglers so one slow peer cannot hold up the blob.
	if missing > 0 && missing <= d.s.cfg.MaxInflight && known == d.count {
		for _, i := range d.order {
			if have.Has(i) || len(d.inflight[i]) != 1 {
				continue
			}
			if from, ok := d.peerFor(i, now, d.inflight[i]...); ok {
				return i, from, true
			}
		}
	}
	return 0, "", false
}

// readerSlots is how many downloads may serve a blocked reader at once.
const readerSlots = 2

// readerSlots counts downloads in flight at or after the reader's piece.
func (d *download) readerSlots() int {
	w := d.p.Waiting()
	n := 0
	for i := range d.inflight {
		if i >= w && i < w+readerSlots {
			n++
		}
	}
	return n
}

func (d *download) rarity(i int) int {
	n := 0
	for _, ps := range d.peers {
		if !ps.banned && ps.have.Has(i) {
			n++
		}
	}
	return n
}

// peerFor picks the least loaded usable peer that has piece i. Agents are
// preferred over the seed: its upload is the swarm's scarcest resource.
func (d *download) peerFor(i int, now time.Time, exclude ...peer.ID) (peer.ID, bool) {
	var best peer.ID
	bestLoad := 1 << 30
outer:
	for id, ps := range d.peers {
		if ps.banned || ps.inflight >= d.s.cfg.PerPeer || now.Before(ps.cooldown) || !ps.have.Has(i) {
			continue
		}
		for _, x := range exclude {
			if x == id {
				continue outer
			}
		}
		load := ps.inflight
		if ps.seed {
			// The seed's upload is the swarm's scarcest resource: use it
			// only when no agent can serve the piece right now.
			load += 1 << 20
		}
		if load < bestLoad {
			best, bestLoad = id, load
		}
	}
	return best, best != ""
}

// finish handles one piece transfer's outcome.
func (d *download) finish(r result) error {
	d.running--
	d.inflight[r.i] = remove(d.inflight[r.i], r.from)
	if len(d.inflight[r.i]) == 0 {
		delete(d.inflight, r.i)
	}
	ps := d.peers[r.from]
	ps.inflight--
	defer func() { d.s.bufs <- r.buf }()
	switch {
	case r.err == nil:
		if d.p.Have().Has(r.i) {
			return nil // the endgame twin got here first
		}
		if err := d.p.WritePiece(r.i, r.data); err != nil {
			return err
		}
		d.progress = time.Now()
		ps.failures = 0
		if ps.seed {
			d.s.fromSeed.Add(int64(len(r.data)))
		} else {
			d.s.fromPeers.Add(int64(len(r.data)))
		}
	case errors.Is(r.err, pieceserver.ErrCorrupt):
		ps.banned = true
		d.s.log.Warn("peer sent a corrupt piece; dropping it for this blob", zap.String("peer", r.from.String()),
			zap.String("digest", d.req.Digest), zap.Int("piece", r.i), zap.Error(r.err))
	case errors.Is(r.err, pieceserver.ErrBusy), errors.Is(r.err, pieceserver.ErrUnavailable):
		ps.cooldown = time.Now().Add(50 * time.Millisecond)
	default:
		ps.cooldown = time.Now().Add(time.Second)
		if ps.failures++; ps.failures >= 3 {
			ps.banned = true
			d.s.log.Info("peer keeps failing; dropping it for this blob", zap.String("peer", r.from.String()),
				zap.String("digest", d.req.Digest), zap.Error(r.err))
		}
	}
	return nil
}

func remove(ids []peer.ID, id peer.ID) []peer.ID {
	for k, x := range ids {
		if x == id {
			return append(ids[:k], ids[k+1:]...)
		}
	}
	return ids
}
