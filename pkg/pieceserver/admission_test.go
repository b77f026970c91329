package pieceserver

import (
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
)

func TestAdmit(t *testing.T) {
	for _, c := range []struct {
		slots, busy, waiting int
		underused            bool
		want                 Verdict
	}{
		{4, 0, 0, false, Serve},
		{4, 3, 0, false, Serve},
		{4, 4, 0, false, Wait},
		{4, 4, 3, false, Wait},
		{4, 4, 4, false, Refuse},
		{1, 1, 1, false, Refuse},
		// An underused upload serves up to twice its slots at once.
		{4, 4, 4, true, Serve},
		{4, 7, 0, true, Serve},
		{4, 8, 0, true, Wait},
		{4, 8, 4, true, Refuse},
	} {
		if got := Admit(c.slots, c.busy, c.waiting, c.underused); got != c.want {
			t.Errorf("Admit(%d, %d, %d, %v) = %v, want %v", c.slots, c.busy, c.waiting, c.underused, got, c.want)
		}
	}
}

// With every upload slot taken and as many requests waiting, the next one
// is answered busy at once instead of holding the requester's piece
// buffer for QueueWait (before, every request waited); a waiting request
// still gets the slot freed within QueueWait.
func TestFullQueueAnswersBusyAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := NewServer(nil, nil, 1, zap.NewNop())
		held := <-s.slots // the one upload slot is busy
		got := make(chan bool)
		go func() {
			_, _, ok := s.slot()
			got <- ok
		}()
		synctest.Wait() // the first request waits for the slot
		if n := s.waiting.Load(); n != 1 {
			t.Fatalf("%d requests waiting, want 1", n)
		}
		start := time.Now()
		if _, _, ok := s.slot(); ok {
			t.Fatal("a request past the queue's bound got a slot")
		}
		if waited := time.Since(start); waited != 0 {
			t.Fatalf("a request past the queue's bound was answered after %v, want at once", waited)
		}
		time.Sleep(QueueWait / 2)
		s.slots <- held
		if !<-got {
			t.Fatal("the waiting request did not get the freed slot")
		}
		if n := s.waiting.Load(); n != 0 {
			t.Fatalf("%d requests waiting after the slot was handed over, want 0", n)
		}
	})
}

// A waiting request that gets no slot within QueueWait is answered busy.
func TestQueueWaitEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := NewServer(nil, nil, 1, zap.NewNop())
		<-s.slots
		start := time.Now()
		if _, _, ok := s.slot(); ok {
			t.Fatal("got a slot none was free")
		}
		if waited := time.Since(start); waited != QueueWait {
			t.Fatalf("waited %v, want QueueWait %v", waited, QueueWait)
		}
		if n := s.waiting.Load(); n != 0 {
			t.Fatalf("%d requests waiting, want 0", n)
		}
	})
}

// A server whose slots are all busy but whose upload has fallen below what
// it carried takes a request in an extra slot at once.
func TestUnderusedUploadTakesAnExtraSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := NewServer(nil, nil, 1, zap.NewNop())
		<-s.slots
		// 10 MB in the first window, then a trickle.
		s.underused()
		s.served.Add(10 << 20)
		time.Sleep(meterWindow)
		s.underused()
		s.served.Add(1 << 10)
		time.Sleep(meterWindow)
		start := time.Now()
		buf, pool, ok := s.slot()
		if !ok || pool != s.extra || time.Since(start) != 0 {
			t.Fatalf("underused upload: slot %v from the extra pool %v after %v, want at once", ok, pool == s.extra, time.Since(start))
		}
		// No more extra slots than slots: the next request waits.
		if _, _, ok := s.slot(); ok {
			t.Fatal("a request past twice the slots got one")
		}
		pool <- buf
	})
}

func TestMeter(t *testing.T) {
	var m Meter
	t0 := time.Unix(100, 0)
	w := int(meterWindow / time.Millisecond)
	at := func(k int) time.Time { return t0.Add(time.Duration(k*w) * time.Millisecond) } // k windows in
	const full = 100e6 * float64(meterWindow) / float64(time.Second)                     // bytes per window at 100 MB/s
	if m.Underused(at(0), 0) {
		t.Fatal("underused before any window")
	}
	// 100 MB/s for a window: the peak. Not underused at the peak.
	if m.Underused(at(1), int64(full)) {
		t.Fatal("underused at its own peak")
	}
	// Half of it in the next window: underused.
	if !m.Underused(at(2), int64(1.5*full)) {
		t.Fatal("not underused at half its peak")
	}
	// One extra request taken: no other within the window.
	m.Took()
	if m.Underused(at(2), int64(1.6*full)) {
		t.Fatal("underused again in the window an extra request was taken")
	}
	// Back near the peak.
	if m.Underused(at(3), int64(2.57*full)) {
		t.Fatal("underused at 97% of its peak")
	}
	// The peak decays: after a minute at 40 MB/s, that is the link's rate.
	sent := 2.57 * full
	k := 4
	for ; k*w <= 60_000; k++ {
		sent += 0.4 * full
		m.Underused(at(k), int64(sent))
	}
	if m.Underused(at(k), int64(sent+0.4*full)) {
		t.Fatal("still underused at a rate held for a minute")
	}
	// A known cap (--upload-rate) is the measure, not the peak.
	m = Meter{Cap: 100e6}
	m.Underused(at(0), 0)
	if !m.Underused(at(1), int64(0.5*full)) {
		t.Fatal("not underused at half its cap")
	}
}
