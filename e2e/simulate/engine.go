package main

import "math"

// The discrete-event core: a clock in virtual nanoseconds, an event heap,
// and a network of flows sharing port bandwidth.

type event struct {
	at  int64
	seq uint64
	fn  func()
}

// events is a binary min-heap ordered by time, then by insertion, so that
// equal-time events run in the order they were scheduled (deterministic).
type events []event

func (h events) less(i, j int) bool {
	return h[i].at < h[j].at || (h[i].at == h[j].at && h[i].seq < h[j].seq)
}

func (h *events) push(e event) {
	*h = append(*h, e)
	a := *h
	for i := len(a) - 1; i > 0; {
		p := (i - 1) / 2
		if !a.less(i, p) {
			break
		}
		a[i], a[p] = a[p], a[i]
		i = p
	}
}

func (h *events) pop() event {
	a := *h
	top := a[0]
	last := len(a) - 1
	a[0] = a[last]
	a[last] = event{}
	a = a[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(a) && a.less(l, m) {
			m = l
		}
		if r < len(a) && a.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		a[i], a[m] = a[m], a[i]
		i = m
	}
	*h = a
	return top
}

// port is one direction of a node's link: its capacity (bytes/s) is
// shared equally by the flows through it.
type port struct {
	cap   float64
	flows []*flow
	moved float64 // bytes that have left (up ports) or arrived (down ports)
	// level is the port's water level at its last fill: what a flow
	// through it that wants more than its fair share would get.
	level float64
}

// sent is the bytes that have left through up port p so far.
func (s *sim) sent(p *port) float64 {
	n := p.moved
	for _, f := range p.flows {
		n += f.size - f.left + f.rate*float64(s.now-f.last)/1e9
	}
	return n
}

// unlimited stands for a link without a cap.
const unlimited = 1e18

func newPort(bytesPerSec int64) *port {
	if bytesPerSec <= 0 {
		return &port{cap: unlimited}
	}
	return &port{cap: float64(bytesPerSec)}
}

// flow is a transfer from one node's up port to another's down port.
// Rates are max-min fair, computed locally: each port water-fills its
// capacity among its flows, each flow asking for what its other end gave
// it, and a flow runs at the smaller of its two shares. Only the two ports
// whose flow set changed are refilled, so a start or an end costs the
// flows of two ports, not the whole network; shares never sum above a
// port's capacity, so no link is ever oversubscribed.
type flow struct {
	src, dst       *port
	size           float64
	left           float64
	rate           float64 // bytes/s
	sShare, dShare float64 // what the src and dst ports allot it
	hShare         float64 // what the host CPU allots it (when modelled)
	hi             int     // position in the host port's flows
	last           int64   // when left was last brought up to date
	ver            uint32  // bumps on each rate change: stale completion events are ignored
	gen            uint64  // the change that last touched it
	si, di         int     // positions in src.flows and dst.flows
	done           func()
	fail           func()
	over           bool
}

func (s *sim) startFlow(src, dst *port, bytes int64, done, fail func()) *flow {
	f := &flow{src: src, dst: dst, size: float64(bytes), left: float64(bytes), last: s.now, done: done, fail: fail}
	f.si = len(src.flows)
	src.flows = append(src.flows, f)
	f.di = len(dst.flows)
	dst.flows = append(dst.flows, f)
	if h := s.host; h != nil {
		f.hi = len(h.flows)
		h.flows = append(h.flows, f)
	}
	s.changed(src, dst)
	return f
}

// changed refills the two ports whose flow sets changed, then the ports
// at the other end of every flow whose share moved, and so on while
// shares move (up to maxRefills ports), and updates the rates of the flows
// it touched. Token buckets (pkg/ratelimit) are work-conserving: what one
// flow cannot use at its other end goes to the port's other flows, so
// refilling only the two ports would leave capacity idle that the real
// links would use.
func (s *sim) changed(src, dst *port) {
	if h := s.host; h != nil {
		// One machine's CPU is shared equally by every transfer on it.
		for _, f := range h.flows {
			f.hShare = h.cap / float64(len(h.flows))
		}
		defer func() {
			for _, f := range h.flows {
				s.rerate(f)
			}
		}()
	}
	s.gen++
	work := append(s.work[:0], portRef{src, true}, portRef{dst, false})
	touched := s.touched[:0]
	for k := 0; k < len(work) && k < maxRefills; k++ {
		w := work[k]
		for _, f := range s.fill(w.p, w.isSrc) {
			if f.gen != s.gen {
				f.gen = s.gen
				touched = append(touched, f)
			}
			// Its share here moved: its other end may give it more, or
			// take back what it can no longer use for others.
			if w.isSrc {
				work = append(work, portRef{f.dst, false})
			} else {
				work = append(work, portRef{f.src, true})
			}
		}
	}
	for _, f := range src.flows {
		s.rerate(f)
	}
	for _, f := range dst.flows {
		s.rerate(f)
	}
	for _, f := range touched {
		if !f.over {
			s.rerate(f)
		}
	}
	s.work, s.touched = work[:0], touched[:0]
}

// maxRefills bounds the ports one change refills.
const maxRefills = 64

// portRef is a port to refill and which end of its flows it is.
type portRef struct {
	p     *port
	isSrc bool
}

// ask is one flow's demand on a port being filled.
type ask struct {
	f      *flow
	demand float64
}

// fill water-fills p's capacity among its flows: each asks for what its
// other end would give it, that end's water level (an equal split there
// if it was never filled). It returns the flows whose share moved by more
// than 1%.
func (s *sim) fill(p *port, isSrc bool) []*flow {
	n := len(p.flows)
	if n == 0 {
		return nil
	}
	asks := s.asks[:0]
	for _, f := range p.flows {
		other := f.dst
		if !isSrc {
			other = f.src
		}
		share := other.level
		if share <= 0 {
			share = other.cap / float64(len(other.flows))
		}
		asks = append(asks, ask{f, share})
	}
	// Insertion sort: a port has a handful of flows.
	for i := 1; i < len(asks); i++ {
		for j := i; j > 0 && asks[j].demand < asks[j-1].demand; j-- {
			asks[j], asks[j-1] = asks[j-1], asks[j]
		}
	}
	moved := s.moved[:0]
	left := p.cap
	for k, a := range asks {
		give := math.Min(a.demand, left/float64(n-k))
		left -= give
		old := &a.f.sShare
		if !isSrc {
			old = &a.f.dShare
		}
		if math.Abs(give-*old) > 0.01*math.Max(give, *old) {
			moved = append(moved, a.f)
		}
		*old = give
		if k == n-1 {
			p.level = give + left
		}
	}
	s.asks = asks[:0]
	s.moved = moved[:0]
	return moved
}

func (s *sim) rerate(f *flow) {
	f.left -= f.rate * float64(s.now-f.last) / 1e9
	f.last = s.now
	r := math.Min(f.sShare, f.dShare)
	if s.host != nil {
		r = math.Min(r, f.hShare)
	}
	if r == f.rate {
		return
	}
	f.rate = r
	f.ver++
	v := f.ver
	eta := int64(math.Ceil(math.Max(f.left, 0) / r * 1e9))
	s.after(eta, func() {
		if f.ver == v && !f.over {
			s.endFlow(f, true)
		}
	})
}

// endFlow takes f off its ports (completed or aborted) and calls its
// callback.
func (s *sim) endFlow(f *flow, completed bool) {
	if f.over {
		return
	}
	f.left -= f.rate * float64(s.now-f.last) / 1e9
	f.over = true
	moved := f.size
	if !completed {
		moved = f.size - math.Max(f.left, 0)
	}
	f.src.moved += moved
	f.dst.moved += moved
	detach(&f.src.flows, f.si, func(g *flow, i int) { g.si = i })
	detach(&f.dst.flows, f.di, func(g *flow, i int) { g.di = i })
	if h := s.host; h != nil {
		detach(&h.flows, f.hi, func(g *flow, i int) { g.hi = i })
	}
	s.changed(f.src, f.dst)
	if completed {
		if f.done != nil {
			f.done()
		}
	} else if f.fail != nil {
		f.fail()
	}
}

func detach(list *[]*flow, i int, moved func(*flow, int)) {
	a := *list
	last := len(a) - 1
	if i != last {
		a[i] = a[last]
		moved(a[i], i)
	}
	a[last] = nil
	*list = a[:last]
}

// abortAll ends every flow through p as failed.
func (s *sim) abortAll(p *port) {
	for len(p.flows) > 0 {
		s.endFlow(p.flows[len(p.flows)-1], false)
	}
}
