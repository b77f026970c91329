package main

import (
	"time"
)

// Sample is the swarm's state at one moment of a storm: how much of the
// agents' links carry piece bytes, and how far the agents trail the seed.
// A storm slower than T_min shows here as links left idle (Up < 1) or as
// a lag that grows.
type Sample struct {
	T float64 `json:"t_s"`
	// Live is the agents still pulling.
	Live int `json:"live"`
	// SeedPieces is the pieces the supernodes hold, AgentPieces the mean
	// held by a live agent (both summed over blobs).
	SeedPieces  int     `json:"seed_pieces"`
	AgentPieces float64 `json:"agent_pieces"`
	// KnownPieces is the mean piece CIDs a live agent has learned (from
	// the tracker): it cannot fetch a piece before that.
	KnownPieces float64 `json:"known_pieces"`
	// Up and Down are the live agents' upload and download rates as a
	// fraction of their capacity; IdleUp the fraction uploading nothing.
	Up     float64 `json:"up"`
	Down   float64 `json:"down"`
	IdleUp float64 `json:"idle_up"`
	// Queued is the piece requests waiting in servers' queues, Inflight
	// the mean requests a live agent has out.
	Queued   int     `json:"queued"`
	Inflight float64 `json:"inflight"`
	// Outcomes counts piece fetches ended since the last sample, by
	// outcome (as Result.Fetches).
	Outcomes [6]int64 `json:"outcomes"`
}

// sampleEvery is the timeline's spacing in virtual time.
const sampleEvery = 250 * time.Millisecond

// startTimeline samples the swarm every sampleEvery until the storm ends.
func (s *sim) startTimeline() {
	var last [6]int64
	var tick func()
	tick = func() {
		s.timeline = append(s.timeline, s.sample(&last))
		if s.done+s.left < len(s.agents) {
			s.after(int64(sampleEvery), tick)
		}
	}
	s.after(int64(sampleEvery), tick)
}

func (s *sim) sample(last *[6]int64) Sample {
	smp := Sample{T: time.Duration(s.now).Seconds()}
	var up, down, capacity float64
	idle, held, known, inflight := 0, 0, 0, 0
	for _, a := range s.agents {
		if a.n.dead || a.done >= 0 {
			continue
		}
		smp.Live++
		capacity += a.n.up.cap
		r := 0.0
		for _, f := range a.n.up.flows {
			r += f.rate
		}
		up += r
		if r == 0 {
			idle++
		}
		for _, f := range a.n.down.flows {
			down += f.rate
		}
		smp.Queued += len(a.n.queue)
		for _, p := range a.pulls {
			if p != nil && p.store != nil {
				h := p.store.Have()
				held += h.Count()
				if p.sched != nil {
					known += p.sched.Known()
				}
				inflight += len(p.reqs)
			}
		}
	}
	for _, sn := range s.sns {
		for _, st := range sn.seeds {
			if st != nil {
				smp.SeedPieces += st.have.Count()
			}
		}
	}
	for k := range smp.Outcomes {
		smp.Outcomes[k] = s.outcomes[k] - last[k]
	}
	*last = s.outcomes
	if smp.Live > 0 {
		smp.AgentPieces = float64(held) / float64(smp.Live)
		smp.KnownPieces = float64(known) / float64(smp.Live)
		smp.IdleUp = float64(idle) / float64(smp.Live)
		smp.Inflight = float64(inflight) / float64(smp.Live)
		if capacity < unlimited {
			smp.Up, smp.Down = up/capacity, down/capacity
		}
	}
	return smp
}
