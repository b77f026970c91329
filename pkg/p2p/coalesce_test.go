package p2p

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
)

// countingConn records every write that reaches it.
type countingConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes = append(c.writes, bytes.Clone(b))
	return len(b), nil
}

func (c *countingConn) Close() error { return nil }

// Before start every write goes through (the TLS handshake needs its
// answers); after it, writes wait for flush and go out as one, in order.
func TestCoalescingConnGathersWritesUntilFlush(t *testing.T) {
	under := &countingConn{}
	c := newCoalescingConn(under, &coalesceBufs{})
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if len(under.writes) != 1 {
		t.Fatalf("before start: %d writes reached the conn, want 1", len(under.writes))
	}
	c.start()
	for _, s := range []string{"a", "bb", "ccc"} {
		if _, err := c.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	if len(under.writes) != 1 {
		t.Fatalf("after start, before flush: %d writes reached the conn, want 1", len(under.writes))
	}
	if err := c.flush(); err != nil {
		t.Fatal(err)
	}
	if len(under.writes) != 2 || string(under.writes[1]) != "abbccc" {
		t.Fatalf("flush wrote %q, want one write of abbccc", under.writes[1:])
	}
	big := bytes.Repeat([]byte{7}, coalesceMax+1)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(big); err != nil {
		t.Fatal(err)
	}
	if len(under.writes) != 4 || string(under.writes[2]) != "x" || len(under.writes[3]) != len(big) {
		t.Fatalf("a write larger than the buffer: got %d writes, want the gathered x, then the big one", len(under.writes))
	}
}

// Closing does not wait for a write stuck on a peer that does not read:
// the close is what unblocks it.
func TestCoalescingConnCloseBreaksABlockedWrite(t *testing.T) {
	a, b := net.Pipe() // synchronous: a write blocks until b reads
	defer b.Close()
	c := newCoalescingConn(a, &coalesceBufs{})
	c.start()
	if _, err := c.Write([]byte("stuck")); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- c.flush() }()
	// The flush holds the write lock while it blocks; wait until it does.
	for c.wmu.TryLock() {
		c.wmu.Unlock()
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-flushed; !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("blocked flush ended with %v, want an error", err)
	}
}
