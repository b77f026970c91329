package swarm

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/registryproxy"
)

// A supernode that stays connected but answers late (CPU-starved) is slow,
// not dead: a permit request that times out counts as a refusal (keep
// waiting on the swarm) and a poll is asked again; only an unreachable
// supernode is an error that sends the agent to the registry alone.
// Before, one timed-out permit request sent the agent to the registry:
// in a 100-node storm on two cores, every agent did.
func TestSlowTrackerIsNotADeadOne(t *testing.T) {
	server, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	defer close(release)
	var asked atomic.Int64
	server.SetStreamHandler(swarmproto.TrackerProtocol, func(s network.Stream) {
		var req swarmproto.TrackerRequest
		if wire.ReadMsg(s, &req, swarmproto.MaxRequestBytes) == nil {
			asked.Add(1)
		}
		<-release // never answers while the test runs
		s.Reset()
	})
	client, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}); err != nil {
		t.Fatal(err)
	}
	tc := &trackerClient{host: client, peer: server.ID(), timeout: 100 * time.Millisecond, patience: 350 * time.Millisecond,
		req: registryproxy.BlobRequest{Digest: "sha256:" + strings.Repeat("ab", 32)}}
	ctx := context.Background()

	granted, _, err := tc.permit(ctx)
	if err != nil || granted {
		t.Fatalf("permit from a connected, silent supernode: granted %v, error %v; want a refusal", granted, err)
	}
	before := asked.Load()
	if _, err := tc.poll(ctx, 0, nil, false, -1, nil); !errors.Is(err, errLate) {
		t.Fatalf("poll error %v, want a late answer", err)
	}
	if n := asked.Load() - before; n < 2 {
		t.Fatalf("poll asked %d times within its patience, want it asked again", n)
	}

	server.Close()
	if _, _, err := tc.permit(ctx); err == nil {
		t.Fatal("permit from a supernode that is gone: no error, so the agent would wait forever")
	}
}
