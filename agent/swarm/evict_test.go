package swarm_test

import (
	"testing"
	"time"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/config"
)

// An agent whose store evicts a blob withdraws it from the tracker (the
// store's OnRemove hook), so nobody is sent to it for pieces it no longer
// has.
func TestEvictedBlobIsWithdrawnFromTheTracker(t *testing.T) {
	up := testregistry.New(t)
	a := up.Push(t, "a:v1", 1, 1<<20)
	up.Push(t, "b:v1", 1, 1<<20)
	key := swarmKey(t)
	sn := startSupernode(t, key, up.URL(), 0)
	// Room for one layer: pulling b's evicts a's.
	n := startAgent(t, key, up.URL(), sn.Addrs(), func(c *agent.Config) { c.CacheSize = config.Bytes(1200 << 10); c.Prefetch = false })
	layers, _ := a.Layers()
	d, _ := layers[0].Digest()
	if err := pull(n.srv.URL, "a:v1"); err != nil {
		t.Fatal(err)
	}
	if got := trackedPeers(t, sn, d.String()); got != 1 {
		t.Fatalf("%d members of a's layer after the pull, want the agent", got)
	}
	if err := pull(n.srv.URL, "b:v1"); err != nil {
		t.Fatal(err)
	}
	// The withdrawal is sent in the background: wait for it, bounded.
	deadline := time.Now().Add(10 * time.Second)
	for trackedPeers(t, sn, d.String()) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the agent still holds a's evicted layer in the tracker after 10 s")
		}
		<-time.After(20 * time.Millisecond)
	}
}
