package main

import (
	"math/rand/v2"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/agent/swarm"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/pieceserver"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// agent is one node's agent and its client pulling the image: the same
// driving of swarm.Sched as agent/swarm's download.go, with virtual time,
// simulated transfers and the supernode's real tracker State.
type agent struct {
	s       *sim
	n       *node
	bufs    int // free piece buffers (MaxInflight, shared by all blobs)
	pulls   []*pull
	next    int   // next blob the client reads
	active  int   // blobs the client is reading
	filled  int   // blobs whose fill has ended (here whole)
	done    int64 // completion time, -1 until every blob is here
	fellBck bool
}

func (a *agent) has(b *blob, i int) bool {
	p := a.pulls[b.idx]
	return p != nil && p.store != nil && p.store.Has(i)
}

func (a *agent) bitmap(b *blob) []byte {
	p := a.pulls[b.idx]
	if p == nil || p.store == nil {
		return nil
	}
	have := p.store.Have()
	return have.Bytes()
}

// start is the client's pull. With Prefetch (the agent's default,
// registryproxy's prefetch on a manifest GET) the agent starts every
// layer's fill at once and the client then reads up to ClientBlobs of them
// at a time; without it, a fill starts when the client asks for its blob.
func (a *agent) start() {
	if a.s.cfg.Prefetch {
		for _, b := range a.s.blobs {
			a.fill(b)
		}
	}
	a.read()
}

// fill starts the agent's fill of blob b, unless it runs already.
func (a *agent) fill(b *blob) *pull {
	if p := a.pulls[b.idx]; p != nil {
		return p
	}
	p := &pull{a: a, b: b, rng: rand.New(rand.NewPCG(a.s.cfg.Seed, uint64(a.n.idx)<<8|uint64(b.idx)))}
	a.pulls[b.idx] = p
	p.join()
	return p
}

// read has the client ask for blobs, up to ClientBlobs at once. A reader
// of a blob whose fill has ended is done at once (it reads from disk).
func (a *agent) read() {
	for a.active < a.s.cfg.ClientBlobs && a.next < len(a.s.blobs) {
		b := a.s.blobs[a.next]
		a.next++
		a.active++
		p := a.fill(b)
		p.reading = true
		if p.state == finished {
			a.readDone()
		}
	}
}

// blobDone is a fill ending with the whole blob here.
func (a *agent) blobDone(p *pull) {
	a.filled++
	if p.reading {
		a.readDone()
	}
}

// readDone is the client finishing one blob: it asks for the next, and
// when it has read them all, its pull is done.
func (a *agent) readDone() {
	a.active--
	a.read()
	if a.active == 0 && a.next == len(a.s.blobs) && a.filled == len(a.s.blobs) && !a.n.dead && a.done < 0 {
		a.done = a.s.now
		a.s.done++
	}
}

// leave takes the node away mid-storm (a crash: no goodbye to anyone).
func (a *agent) leave() {
	if a.n.dead || a.done >= 0 {
		return
	}
	a.n.dead = true
	a.s.left++
	for _, p := range a.pulls {
		if p != nil {
			p.stop()
			p.lost()
		}
	}
	a.s.abortAll(a.n.up)
	a.s.abortAll(a.n.down)
	a.n.queue = nil
}

// Pull states.
const (
	joining = iota
	running
	fallingBack
	finished
)

// pull is one blob's Fill on one agent.
type pull struct {
	a     *agent
	b     *blob
	rng   *rand.Rand
	state int
	gen   int // bumps when the download ends: late outcomes are dropped
	// reading: the client reads this blob, so a reader waits on its first
	// missing piece (a prefetched blob nobody reads yet has no reader).
	reading bool

	store     *swarm.MemPartial
	sched     *swarm.Sched
	joinStart int64

	// The tracker client's pacing: the earliest next paced request.
	next       int64
	lastPoll   int64
	announcing bool
	holder     bool // announced a piece
	signalled  bool
	starved    bool
	asking     bool // a permit request is out
	permit     bool // holds a back-to-source permit

	reqs []*pieceReq // in flight

	// The watch protocol, served: the pulls watching this one's bitmap,
	// and the coalescing of its messages.
	watchers []*pull
	telling  bool
	told     int64
}

// watchEvery is the piece server's coalescing of watch messages.
const watchEvery = int64(50 * time.Millisecond)

// watch starts the watches the policy picks: as pkg/pieceserver's watch
// protocol, the watched peer answers with its bitmap, then sends it again
// each time it grows, coalesced, until it holds the whole blob.
func (p *pull) watch() {
	s := p.a.s
	for {
		id, ok := p.sched.Watch()
		if !ok {
			return
		}
		var q *pull
		if n := s.byID[id]; n != nil && n.agent != nil {
			q = n.agent.pulls[p.b.idx]
		}
		gen := p.gen
		s.after(s.latency(), func() {
			switch {
			case q == nil || q.a.n.dead || q.sched == nil || q.state == fallingBack:
				s.after(s.latency(), func() { p.unwatched(gen, id) })
			case len(q.watchers) >= pieceserver.MaxWatchers:
				s.watches.Refused++
				s.after(s.latency(), func() { p.unwatched(gen, id) })
			default:
				s.watches.Started++
				q.watchers = append(q.watchers, p)
				q.send(p)
			}
		})
	}
}

func (p *pull) unwatched(gen int, id peer.ID) {
	if p.gen == gen && p.sched != nil {
		p.sched.Unwatched(id)
		p.wake()
	}
}

// send is one watch message from p to watcher w: p's bitmap.
func (p *pull) send(w *pull) {
	s := p.a.s
	have := p.store.Have()
	b, gen := have.Bytes(), w.gen
	s.after(s.latency(), func() {
		if w.gen != gen || !w.alive() || w.state != running {
			return
		}
		s.watches.News++
		w.sched.PeerHave(p.a.n.id, b)
		if have.Complete() {
			w.sched.Unwatched(p.a.n.id)
		}
		w.wake()
	})
}

// tell sends p's bitmap to its watchers, at most every watchEvery.
func (p *pull) tell() {
	if p.telling {
		return
	}
	p.telling = true
	s := p.a.s
	s.after(max(0, p.told+watchEvery-s.now), func() {
		p.telling = false
		p.told = s.now
		if p.a.n.dead {
			return
		}
		live := p.watchers[:0]
		for _, w := range p.watchers {
			if w.alive() && w.state == running {
				p.send(w)
				live = append(live, w)
			}
		}
		p.watchers = live
		if p.store.Have().Complete() {
			p.watchers = nil // the watches end with the whole blob
		}
	})
}

// lost ends the watches of p's watchers: p's node is gone.
func (p *pull) lost() {
	s := p.a.s
	for _, w := range p.watchers {
		gen, id := w.gen, p.a.n.id
		s.after(s.latency(), func() { w.unwatched(gen, id) })
	}
	p.watchers = nil
}

// minInterval is the least time between paced tracker requests, whatever
// the tracker says (agent/swarm's tracker client).
const minInterval = int64(100 * time.Millisecond)

func (p *pull) interval(resp *swarmproto.TrackerResponse) int64 {
	if resp == nil {
		return minInterval
	}
	return max(minInterval, resp.Interval*int64(time.Millisecond))
}

func (p *pull) alive() bool { return !p.a.n.dead }

// waiting is the piece the client's reader is blocked on, or -1.
func (p *pull) waiting() int {
	if !p.reading {
		return -1
	}
	return p.store.Waiting()
}

func (p *pull) pollReq() *swarmproto.TrackerRequest {
	req := &swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: p.b.digest, Registry: "registry.sim", Repo: "sim/image",
		Addrs: p.a.n.addrs, Want: -1}
	if p.sched != nil {
		have := p.store.Have()
		req.Known, req.Have, req.Starved, req.Want = p.sched.Known(), have.Bytes(), p.starved, p.waiting()
		req.Failed = p.failures()
	}
	return req
}

func (p *pull) failures() []swarmproto.Failure {
	var out []swarmproto.Failure
	for _, f := range p.sched.Failures() {
		out = append(out, swarmproto.Failure{Peer: f.Peer.String(), Piece: f.Piece, Corrupt: f.Corrupt})
	}
	return out
}

// join polls until the seed knows the blob's size (waitForSize).
func (p *pull) join() {
	s := p.a.s
	p.joinStart = s.now
	p.pollJoin()
}

func (p *pull) pollJoin() {
	s := p.a.s
	p.b.owner.request(p.a, p.pollReq(), func(resp *swarmproto.TrackerResponse) {
		if !p.alive() {
			return
		}
		p.next = s.now + p.interval(resp)
		switch {
		case resp.Error != "":
			p.fallBack()
		case resp.Size >= 0:
			p.begin(resp)
		case time.Duration(s.now-p.joinStart) > s.cfg.StallTimeout:
			p.fallBack()
		default:
			s.after(p.next-s.now, p.pollJoin)
		}
	})
}

func (p *pull) begin(first *swarmproto.TrackerResponse) {
	s := p.a.s
	p.state = running
	p.store = swarm.NewMemPartial(first.Size, first.PieceSize, false, true)
	cfg := swarm.SchedConfig{MaxInflight: s.cfg.MaxInflight, PerPeer: s.cfg.PerPeer, StallTimeout: s.cfg.StallTimeout, Watch: s.cfg.Watch}
	if cfg.Watch == 0 {
		cfg.Watch = -1 // none (the Sched's 0 is its default)
	}
	p.sched = swarm.NewSched(cfg, p.a.n.id, first.Size, first.PieceSize, p.rng, s.vnow())
	if _, err := p.sched.Tracker(s.vnow(), first); err != nil {
		p.fallBack()
		return
	}
	gen := p.gen
	p.lastPoll = s.now
	s.after(max(0, p.next-s.now), func() { p.poll(gen) })
	s.after(int64(100*time.Millisecond), func() { p.tick(gen) })
	p.wake()
}

// poll is the poll loop: at most every 100 ms, and never before the
// tracker's interval.
func (p *pull) poll(gen int) {
	s := p.a.s
	if p.gen != gen || !p.alive() {
		return
	}
	if wait := max(p.lastPoll+minInterval, p.next) - s.now; wait > 0 {
		s.after(wait, func() { p.poll(gen) })
		return
	}
	p.lastPoll = s.now
	p.b.owner.request(p.a, p.pollReq(), func(resp *swarmproto.TrackerResponse) {
		if p.gen != gen || !p.alive() {
			return
		}
		p.next = s.now + p.interval(resp)
		if resp.Error != "" {
			p.fallBack()
			return
		}
		if _, err := p.sched.Tracker(s.vnow(), resp); err != nil {
			p.fallBack()
			return
		}
		p.poll(gen)
		p.wake()
	})
}

// announce is the announce loop: one paced have at a time, coalescing.
func (p *pull) announce() {
	if p.announcing {
		p.signalled = true
		return
	}
	p.announcing = true
	s := p.a.s
	gen := p.gen
	// The first piece is announced at once (trackerClient.have).
	wait := max(0, p.next-s.now)
	first := !p.holder
	if first {
		wait = 0
		p.holder = true
	}
	s.after(wait, func() {
		if p.gen != gen || !p.alive() {
			return
		}
		have := p.store.Have()
		req := &swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: p.b.digest, Addrs: p.a.n.addrs, Have: have.Bytes(), Want: -1, Failed: p.failures()}
		p.b.owner.request(p.a, req, func(resp *swarmproto.TrackerResponse) {
			if !first {
				p.next = s.now + p.interval(resp) // an unpaced request leaves the pace alone
			}
			p.announcing = false
			if p.signalled && p.gen == gen {
				p.signalled = false
				p.announce()
			}
		})
	})
}

// tick is the driver's 100 ms ticker: stall detection.
func (p *pull) tick(gen int) {
	s := p.a.s
	if p.gen != gen || !p.alive() || p.state != running {
		return
	}
	for _, r := range p.reqs {
		if r.fl != nil && !r.fl.over {
			p.sched.SawData(s.vnow()) // bytes are arriving
			break
		}
	}
	if !p.asking && p.sched.Stalled(s.vnow()) {
		// Ask the owning supernode for a back-to-source permit; refused,
		// stay with the swarm.
		p.asking = true
		p.b.owner.request(p.a, &swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Digest: p.b.digest, Want: -1},
			func(resp *swarmproto.TrackerResponse) {
				p.asking = false
				if p.gen != gen || !p.alive() {
					return
				}
				if resp.Permit {
					p.permit = true
					p.fallBack()
					p.renew(time.Duration(resp.PermitTTL) * time.Millisecond)
					return
				}
				p.sched.Denied(s.vnow())
			})
	}
	p.wake()
	s.after(int64(100*time.Millisecond), func() { p.tick(gen) })
}

// wake is the top of the driver's loop: done? else start fetches while
// there is room, and update starvation.
func (p *pull) wake() {
	if p.state != running || !p.alive() {
		return
	}
	s := p.a.s
	have := p.store.Have()
	if have.Complete() {
		p.finish()
		return
	}
	now := s.vnow()
	for {
		f, ok := p.sched.Next(now, &have, p.waiting())
		if !ok {
			break
		}
		if p.a.bufs == 0 {
			p.sched.Waited(now)
			break
		}
		p.a.bufs--
		p.sched.Start(f)
		s.requestPiece(p, f)
	}
	p.watch()
	p.starved = p.sched.Starved(now)
}

// result is one fetch's outcome arriving at the agent.
func (p *pull) result(r *pieceReq, out swarm.Outcome, have []byte) {
	if r.gone {
		return
	}
	r.gone = true
	p.dropReq(r)
	p.a.bufs++
	p.a.s.outcomes[out]++
	if p.gen != r.gen || !p.alive() || p.state != running {
		return
	}
	s := p.a.s
	now := s.vnow()
	if out == swarm.Got {
		if p.store.Has(r.f.Piece) {
			out = swarm.Dup
		} else {
			_, length := piece.Bounds(r.f.Piece, p.b.size, s.cfg.PieceSize)
			if err := p.store.WritePiece(r.f.Piece, s.zero[:length]); err != nil {
				panic(err) // a simulator bug, not a condition of the storm
			}
		}
	}
	p.sched.Done(now, r.f, out)
	if have != nil {
		p.sched.PeerHave(r.f.From, have)
	}
	if out == swarm.Got {
		p.announce()
		p.tell()
	}
	p.wake()
}

func (p *pull) dropReq(r *pieceReq) {
	for k, x := range p.reqs {
		if x == r {
			p.reqs[k] = p.reqs[len(p.reqs)-1]
			p.reqs = p.reqs[:len(p.reqs)-1]
			return
		}
	}
}

// stop ends the download: in-flight fetches are cancelled and their
// buffers return to the pool.
func (p *pull) stop() {
	p.gen++
	for _, r := range p.reqs {
		r.gone = true
		r.queued = false
		if r.fl != nil && !r.fl.over {
			p.a.s.endFlow(r.fl, false)
		}
		p.a.bufs++
	}
	p.reqs = nil
}

func (p *pull) finish() {
	s := p.a.s
	p.stop()
	p.state = finished
	// announceFinal: the complete bitmap, at once.
	all := piece.NewBitmap(p.b.count)
	for i := range p.b.count {
		all.Set(i)
	}
	p.b.owner.request(p.a, &swarmproto.TrackerRequest{Op: swarmproto.OpHave, Digest: p.b.digest, Addrs: p.a.n.addrs, Have: all.Bytes(), Want: -1},
		func(*swarmproto.TrackerResponse) {})
	_ = s
	p.a.blobDone(p)
}

// renew keeps a back-to-source permit while the fetch runs: asked again
// at half its lease.
func (p *pull) renew(lease time.Duration) {
	if lease <= 0 {
		return
	}
	s := p.a.s
	s.after(int64(lease/2), func() {
		if p.state != fallingBack || !p.alive() {
			return
		}
		p.b.owner.request(p.a, &swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Digest: p.b.digest, Want: -1}, func(*swarmproto.TrackerResponse) {})
		p.renew(lease)
	})
}

// fallBack fetches the missing pieces from the registry.
func (p *pull) fallBack() {
	s := p.a.s
	p.stop()
	p.state = fallingBack
	if !p.a.fellBck {
		p.a.fellBck = true
		s.fallbacks++
	}
	missing := p.b.size
	if p.store != nil {
		have := p.store.Have()
		missing = 0
		for i := range p.b.count {
			if !have.Has(i) {
				_, length := piece.Bounds(i, p.b.size, s.cfg.PieceSize)
				missing += length
			}
		}
	} else {
		p.store = swarm.NewMemPartial(p.b.size, s.cfg.PieceSize, false, true)
	}
	b := p.b
	s.mf.blobGet(p.a)
	b.fetching++
	s.maxFetching = max(s.maxFetching, b.fetching)
	s.after(2*s.latency(), func() {
		if !p.alive() {
			b.fetching--
			return
		}
		s.startFlow(s.registry, p.a.n.down, missing, func() {
			b.fetching--
			for i := range p.b.count {
				if !p.store.Has(i) {
					_, length := piece.Bounds(i, p.b.size, s.cfg.PieceSize)
					_ = p.store.WritePiece(i, s.zero[:length])
				}
			}
			if p.permit {
				p.b.owner.request(p.a, &swarmproto.TrackerRequest{Op: swarmproto.OpRelease, Digest: p.b.digest, Want: -1},
					func(*swarmproto.TrackerResponse) {})
			}
			p.finish()
		}, nil)
	})
}
