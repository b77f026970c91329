package p2p

import (
	"net"
	"sync"

	"github.com/libp2p/go-libp2p/core/sec"
)

// coalesceMax is the size of a coalescingConn's buffers: a yamux frame (at
// most 64 KiB) and the TLS records it becomes fit in one. (Frames of 256 KiB
// or 1 MiB measured no cheaper per byte once their records go out in one
// write, and a session queues up to 64 frames: 64 KiB keeps that at 4 MiB.)
const coalesceMax = 96 << 10

// coalesceBufs holds the buffers of a host's coalescingConns. A conn holds
// one only while it has bytes in it (during a write), so an idle connection
// costs no buffer: a supernode has thousands of them.
type coalesceBufs struct{ sync.Pool }

func (p *coalesceBufs) get() *[]byte {
	if b, ok := p.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, coalesceMax)
	return &b
}

// coalescingConn sits between TLS and TCP. Go's TLS writes every record
// (at most 16 KiB) with its own system call, so a 64 KiB yamux frame
// costs 4 writes, 4 trips through the TCP stack and as many wake-ups of
// the reader. Once the handshake is done (start), writes are gathered and
// go out at once when the secure conn's Write returns (see flushingConn).
// Before start it writes through. (Gathering reads the same way measured
// no better: TLS's reads already take what the socket has.)
type coalescingConn struct {
	net.Conn
	bufs *coalesceBufs

	wmu  sync.Mutex
	on   bool
	wbuf *[]byte // gathered bytes (nil: none)
}

func newCoalescingConn(c net.Conn, bufs *coalesceBufs) *coalescingConn {
	return &coalescingConn{Conn: c, bufs: bufs}
}

// start turns coalescing on: bytes written from now on wait for flush.
func (c *coalescingConn) start() {
	c.wmu.Lock()
	c.on = true
	c.wmu.Unlock()
}

func (c *coalescingConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if !c.on {
		return c.Conn.Write(b)
	}
	if c.wbuf != nil && len(*c.wbuf)+len(b) > coalesceMax {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(b) > coalesceMax {
		return c.Conn.Write(b)
	}
	if c.wbuf == nil {
		c.wbuf = c.bufs.get()
		*c.wbuf = (*c.wbuf)[:0]
	}
	*c.wbuf = append(*c.wbuf, b...)
	return len(b), nil
}

// flush writes the gathered bytes.
func (c *coalescingConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.flushLocked()
}

func (c *coalescingConn) flushLocked() error {
	if c.wbuf == nil {
		return nil
	}
	_, err := c.Conn.Write(*c.wbuf)
	c.bufs.Put(c.wbuf)
	c.wbuf = nil
	return err
}

// Close writes what is gathered (TLS's close_notify alert) and closes. A
// write in progress (blocked on a peer that does not read) is not waited
// for: closing is what breaks it, as TLS's own Close relies on.
func (c *coalescingConn) Close() error {
	if c.wmu.TryLock() {
		_ = c.flushLocked()
		c.wmu.Unlock()
	}
	return c.Conn.Close()
}

// flushingConn is a secure conn over a coalescingConn: each Write reaches
// the network, as one write, before it returns.
type flushingConn struct {
	sec.SecureConn
	raw *coalescingConn
}

func (f *flushingConn) Write(b []byte) (int, error) {
	n, err := f.SecureConn.Write(b)
	if ferr := f.raw.flush(); err == nil && ferr != nil {
		return 0, ferr
	}
	return n, err
}
