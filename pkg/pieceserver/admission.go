package pieceserver

import "time"

// QueueWait bounds how long a request waits for an upload slot before it
// is answered busy.
const QueueWait = 250 * time.Millisecond

// Verdict is what the piece server does with a request that arrives.
type Verdict int

// Verdicts of Admit.
const (
	Serve  Verdict = iota // a slot is free: serve it now
	Wait                  // wait for a slot, at most QueueWait
	Refuse                // answer busy at once
)

// Admit is the piece server's admission rule, as pure code (the simulator
// runs it too): a request that arrives when busy of the server's slots
// upload slots are taken and waiting requests already wait for one is
// served at once if a slot is free, or if the server's upload is
// underused (Meter) and fewer than twice its slots are busy; it waits for
// a slot if fewer than slots requests wait, and is otherwise answered
// busy at once.
//
// Waiting a little beats answering busy (a few full-speed uploads spread
// pieces sooner than many slow ones, and a wait costs no retry), but a
// long queue holds the requesters' piece buffers on a server that cannot
// serve them soon, while a peer with a free slot may have the same piece:
// at 300 simulated nodes bounding the queue took a storm from 1.50x to
// 1.32x its ideal time. The extra slots of an underused server answer the
// other waste: slots full of peers whose own downloads are full, while the
// link could carry more (at 1,000 simulated nodes link use went from 0.90
// to 0.93-0.94).
func Admit(slots, busy, waiting int, underused bool) Verdict {
	switch {
	case busy < slots:
		return Serve
	case underused && busy < 2*slots:
		return Serve
	case waiting < slots:
		return Wait
	default:
		return Refuse
	}
}
