package swarm

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/registryproxy"
)

// A supernode that stays connected but answers late (CPU-starved) is slow,
// not dead: a permit request that times out counts as a refusal (keep
// waiting on the swarm), and a late poll is slow, not lost; only an
// unreachable supernode is an error that sends the agent to the registry
// alone. Before, one timed-out permit request sent the agent to the
// registry: in a 100-node storm on two cores, every agent did.
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
	_, err = tc.poll(ctx, 0, nil, false, -1, nil)
	if !errors.Is(err, errLate) || !tc.slow(err) {
		t.Fatalf("poll error %v, want a late answer from a slow supernode", err)
	}

	server.Close()
	if _, _, err := tc.permit(ctx); err == nil {
		t.Fatal("permit from a supernode that is gone: no error, so the agent would wait forever")
	}
}

// A connected supernode that has answered nothing for deadAfter is lost
// even though its connection holds: the agent may then go alone.
func TestSilentTrackerIsLostAfterDeadAfter(t *testing.T) {
	release := make(chan struct{})
	server, client := trackerPair(t, func(s network.Stream) {
		var req swarmproto.TrackerRequest
		_ = wire.ReadMsg(s, &req, swarmproto.MaxRequestBytes)
		<-release // never answers while the test runs
		s.Reset()
	})
	t.Cleanup(func() { close(release) }) // before the hosts close
	tc := &trackerClient{host: client, peer: server.ID(), timeout: 50 * time.Millisecond, patience: 150 * time.Millisecond,
		deadAfter: time.Second, req: registryproxy.BlobRequest{Digest: "sha256:" + strings.Repeat("ab", 32)}}
	ctx := context.Background()
	start := time.Now()
	if _, err := tc.poll(ctx, 0, nil, false, -1, nil); !tc.slow(err) {
		t.Fatalf("first poll: %v, want slow", err)
	}
	for {
		_, err := tc.poll(ctx, 0, nil, false, -1, nil)
		if !errors.Is(err, errLate) {
			t.Fatalf("poll: %v, want late", err)
		}
		if !tc.slow(err) {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("a supernode silent for 10 s is still counted as slow with deadAfter 1 s")
		}
	}
	if e := time.Since(start); e < time.Second {
		t.Fatalf("counted as lost after %v, before deadAfter", e)
	}
	if _, _, err := tc.permit(ctx); err == nil {
		t.Fatal("permit from a supernode silent past deadAfter: a refusal, so the agent would wait forever")
	}
}

// A late answer is waited for on the same stream, not asked for again:
// re-asking throws away the work a starved supernode did, and once its
// queue is longer than the timeout, no answer ever arrives. Fails before
// (each exchange was cut at the timeout and asked again until patience).
func TestLateAnswerIsWaitedFor(t *testing.T) {
	var asked atomic.Int64
	server, client := trackerPair(t, func(s network.Stream) {
		var req swarmproto.TrackerRequest
		if wire.ReadMsg(s, &req, swarmproto.MaxRequestBytes) != nil {
			return
		}
		asked.Add(1)
		time.Sleep(400 * time.Millisecond) // a queue 4 timeouts long
		_ = wire.WriteMsg(s, &swarmproto.TrackerResponse{Version: 1, Size: 10, PieceSize: 1 << 20, Interval: 1})
		s.Close()
	})
	tc := &trackerClient{host: client, peer: server.ID(), timeout: 100 * time.Millisecond, patience: 5 * time.Second,
		req: registryproxy.BlobRequest{Digest: "sha256:" + strings.Repeat("ab", 32)}}
	resp, err := tc.poll(context.Background(), 0, nil, false, -1, nil)
	if err != nil || resp.Size != 10 {
		t.Fatalf("poll of a supernode that answers in 400 ms: %+v, %v", resp, err)
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("the supernode was asked %d times for one answer, want 1", n)
	}
}

// trackerPair connects a client host to a server host whose tracker
// protocol handler is h.
func trackerPair(t *testing.T, h network.StreamHandler) (server, client host.Host) {
	t.Helper()
	server, err := p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	server.SetStreamHandler(swarmproto.TrackerProtocol, h)
	client, err = p2p.NewHost(p2p.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return server, client
}

// A refusal the supernode answers (the seed refused upstream) is an answer,
// not a late one: it must not be waited on as a slow supernode. Fails with
// the first version of the same-stream wait, which read the context after
// cancelling it and called every error late.
func TestRefusalIsNotLate(t *testing.T) {
	server, client := trackerPair(t, func(s network.Stream) {
		var req swarmproto.TrackerRequest
		if wire.ReadMsg(s, &req, swarmproto.MaxRequestBytes) != nil {
			return
		}
		_ = wire.WriteMsg(s, &swarmproto.TrackerResponse{Version: 1, Size: -1, Error: "refused upstream", Status: 404, Interval: 1})
		s.Close()
	})
	tc := &trackerClient{host: client, peer: server.ID(), req: registryproxy.BlobRequest{Digest: "sha256:" + strings.Repeat("ab", 32)}}
	_, err := tc.poll(context.Background(), 0, nil, false, -1, nil)
	var oe *ocierr.Error
	if !errors.As(err, &oe) || oe.Status != 404 || errors.Is(err, errLate) || tc.slow(err) {
		t.Fatalf("poll answered with a refusal: %v; want the 404, not a late answer", err)
	}
}
