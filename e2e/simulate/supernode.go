package main

import (
	"time"

	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/supernode/tracker"
)

// supernode runs the real tracker State. Its calls are not free: each one
// takes the CPU time the real code took (or the configured cost) on one of
// the supernode's cores, and requests queue for a free core.
type supernode struct {
	s     *sim
	n     *node
	state *tracker.State
	cores int
	busy  int
	jobs  []func() time.Duration
	seeds []*seedState // per blob
}

type seedState struct {
	have          piece.Bitmap
	started, done int64
}

func (sn *supernode) has(b *blob, i int) bool {
	st := sn.seeds[b.idx]
	return st != nil && st.have.Has(i)
}

// submit queues a job for a core; the job runs when the core is free and
// returns the CPU time it took, for which the core stays busy.
func (sn *supernode) submit(job func() time.Duration) {
	if sn.busy < sn.cores {
		sn.runJob(job)
		return
	}
	sn.jobs = append(sn.jobs, job)
}

func (sn *supernode) runJob(job func() time.Duration) {
	sn.busy++
	cost := job()
	sn.s.after(int64(cost), func() {
		sn.busy--
		if len(sn.jobs) > 0 {
			next := sn.jobs[0]
			sn.jobs[0] = nil
			sn.jobs = sn.jobs[1:]
			sn.runJob(next)
		}
	})
}

// measure runs one call of the real tracker code and returns what it is
// charged.
func (sn *supernode) measure(call func()) time.Duration {
	t0 := threadCPU()
	call()
	d := threadCPU() - t0
	sn.s.trackerCPU += d
	if sn.s.cfg.TrackerCost > 0 {
		return sn.s.cfg.TrackerCost
	}
	return d
}

// request delivers a tracker request from agent a (after the link's
// latency), runs it on a core, and hands the answer back after the
// latency again.
func (sn *supernode) request(a *agent, req *swarmproto.TrackerRequest, answer func(*swarmproto.TrackerResponse)) {
	s := sn.s
	s.after(s.latency(), func() {
		sn.submit(func() time.Duration {
			s.trackerRequests++
			var res tracker.Result
			cost := sn.measure(func() { res = sn.state.Handle(s.vnow(), tracker.Asker{ID: a.n.id, IP: a.n.ip}, req) })
			if res.Seed {
				sn.startSeed(s.blobByDigest(req.Digest))
			}
			resp := res.Resp
			s.after(int64(cost)+s.latency(), func() { answer(resp) })
			return cost
		})
	})
}

// charge runs a seed-side tracker call on a core. The seed's upstream read
// does not wait for it.
func (sn *supernode) charge(call func()) {
	sn.submit(func() time.Duration { return sn.measure(call) })
}

// startSeed fetches blob b from the registry once, piece after piece,
// publishing each piece to the tracker as it lands, as the real seed does.
func (sn *supernode) startSeed(b *blob) {
	if b == nil || sn.seeds[b.idx] != nil {
		return
	}
	st := &seedState{have: piece.NewBitmap(b.count), started: sn.s.now}
	sn.seeds[b.idx] = st
	s := sn.s
	s.mf.blobGet(sn)
	// The upstream's response headers take a round trip.
	s.after(2*s.latency(), func() {
		sn.charge(func() { sn.state.SetSize(s.vnow(), b.digest, b.size, s.cfg.PieceSize) })
		sn.seedPiece(b, st, 0)
	})
}

func (sn *supernode) seedPiece(b *blob, st *seedState, i int) {
	s := sn.s
	_, length := piece.Bounds(i, b.size, s.cfg.PieceSize)
	s.startFlow(s.registry, sn.n.down, length, func() {
		st.have.Set(i)
		have := st.have.Bytes()
		sn.charge(func() {
			sn.state.AddPiece(s.vnow(), b.digest, i, b.cids[i])
			sn.state.SetSeedHave(s.vnow(), b.digest, have)
		})
		if i+1 < b.count {
			sn.seedPiece(b, st, i+1)
			return
		}
		st.done = s.now
		sn.charge(func() {
			sn.state.SetMetainfo(s.vnow(), &piece.Metainfo{Digest: b.digest, Size: b.size, PieceSize: s.cfg.PieceSize, Pieces: b.cids}, have)
		})
	}, nil)
}

func (s *sim) blobByDigest(d string) *blob {
	for _, b := range s.blobs {
		if b.digest == d {
			return b
		}
	}
	return nil
}
