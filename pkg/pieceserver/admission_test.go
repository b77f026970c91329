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
		want                 Verdict
	}{
		{4, 0, 0, Serve},
		{4, 3, 0, Serve},
		{4, 4, 0, Wait},
		{4, 4, 3, Wait},
		{4, 4, 4, Refuse},
		{1, 1, 1, Refuse},
	} {
		if got := Admit(c.slots, c.busy, c.waiting); got != c.want {
			t.Errorf("Admit(%d, %d, %d) = %v, want %v", c.slots, c.busy, c.waiting, got, c.want)
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
			_, ok := s.slot()
			got <- ok
		}()
		synctest.Wait() // the first request waits for the slot
		if n := s.waiting.Load(); n != 1 {
			t.Fatalf("%d requests waiting, want 1", n)
		}
		start := time.Now()
		if _, ok := s.slot(); ok {
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
		if _, ok := s.slot(); ok {
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
