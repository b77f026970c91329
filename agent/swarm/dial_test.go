package swarm_test

import (
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

// holdFirst forwards TCP connections to target, except the first, which it
// accepts and holds silently until the test ends: a handshake a starved
// supernode does not finish in time.
func holdFirst(t *testing.T, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for first := true; ; first = false {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			if first {
				continue // held: never answered
			}
			go func() {
				u, err := net.Dial("tcp", target)
				if err != nil {
					c.Close()
					return
				}
				mu.Lock()
				conns = append(conns, u)
				mu.Unlock()
				go func() { _, _ = io.Copy(u, c); u.Close() }()
				_, _ = io.Copy(c, u)
				c.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

// A supernode whose handshake times out is starved, not gone: the agent
// dials it again (past libp2p's dial backoff) for up to --stall-timeout
// instead of going to the registry alone at once. Fails before: the one
// timed-out dial sent the agent upstream for every blob (seen in CI at load
// ~290, where the membership proof timed out).
func TestSupernodeDialTimeoutIsDialledAgain(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 2, 512<<10)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	addr := sn.Addrs()[0] // /ip4/127.0.0.1/tcp/PORT/p2p/ID
	rest := strings.TrimPrefix(addr, "/ip4/127.0.0.1/tcp/")
	port, id, _ := strings.Cut(rest, "/")
	proxy := holdFirst(t, "127.0.0.1:"+port)
	_, pport, _ := net.SplitHostPort(proxy)
	n := startAgent(t, key, up.URL(), []string{"/ip4/127.0.0.1/tcp/" + pport + "/" + id}, func(c *agent.Config) {
		c.StallTimeout = config.Duration(20 * time.Second)
	})
	start := time.Now()
	if err := pull(n.srv.URL, "app:v1"); err != nil {
		t.Fatal(err)
	}
	if s := n.agent.Stats(); s.FromUpstream != 0 {
		t.Fatalf("stats %+v after %v: the agent went to upstream after one timed-out dial", s, time.Since(start))
	}
	assertOneFetchPerBlob(t, up, img)
}
