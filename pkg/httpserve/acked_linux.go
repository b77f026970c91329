package httpserve

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// ackCounter returns a function reporting how many bytes the peer of c
// has acknowledged (TCP_INFO's bytes_acked), or nil when c is not a TCP
// connection.
func ackCounter(c net.Conn) func() (uint64, bool) {
	for {
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = u.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() (uint64, bool) {
		var info *unix.TCPInfo
		var ierr error
		if err := raw.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
			return 0, false
		}
		return info.Bytes_acked, true
	}
}
