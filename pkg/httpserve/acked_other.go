//go:build !linux

package httpserve

import "net"

// ackCounter is nil where the platform does not tell how many bytes the
// peer acknowledged: each write then gets WriteIdle.
func ackCounter(net.Conn) func() (uint64, bool) { return nil }
