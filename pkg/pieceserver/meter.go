package pieceserver

import (
	"math"
	"time"
)

// Meter tells a piece server whether its upload runs below what its link
// can carry, as pure code (the simulator runs it too): the rate of the
// last window of meterWindow against Cap (the agent's --upload-rate) or,
// when that is unknown, the highest window rate seen, which decays so
// that a link that got slower (other traffic, a throttled NIC) is learned
// again. A server whose every slot is busy yet whose link is underused is
// serving peers that cannot take its bytes as fast as it could send them
// (their own downloads are full): one more request uses the rest of its
// upload. One per window (Took): the next window shows what it did.
type Meter struct {
	// Cap is the upload's known rate (bytes/s; 0: unknown, learned as
	// the decaying peak).
	Cap   float64
	start time.Time
	base  int64   // bytes sent at start
	last  float64 // bytes/s over the last full window
	peak  float64 // bytes/s: the highest window rate, decaying
}

// Meter tuning.
const (
	meterWindow = 25 * time.Millisecond
	// peakDecay is the peak's decay per window: it halves in about 3.5 s.
	peakDecay = 0.995
	// underusedBelow is the share of the peak under which the link counts
	// as underused.
	underusedBelow = 0.95
)

// Underused takes in the bytes sent so far at now and reports whether the
// last full window's rate was below underusedBelow of the peak.
func (m *Meter) Underused(now time.Time, sent int64) bool {
	if m.start.IsZero() {
		m.start, m.base = now, sent
		return false
	}
	if d := now.Sub(m.start); d >= meterWindow {
		rate := float64(sent-m.base) / d.Seconds()
		m.peak = max(rate, m.peak*math.Pow(peakDecay, float64(d/meterWindow)))
		m.last = rate
		m.start, m.base = now, sent
	}
	peak := m.peak
	if m.Cap > 0 {
		peak = m.Cap
	}
	return peak > 0 && m.last < underusedBelow*peak
}

// Took records that an extra request was admitted on the last verdict:
// no other until the next window shows what it did to the rate.
func (m *Meter) Took() { m.last = math.Inf(1) }
