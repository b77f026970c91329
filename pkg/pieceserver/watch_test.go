package pieceserver

import (
	"context"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// TestWatchersAreBounded: a blob's watchers beyond MaxWatchers are
// answered busy at once, and a watch that ends frees its place.
func TestWatchersAreBounded(t *testing.T) {
	keyPath, st := keyAndStore(t)
	// A blob of two pieces with neither here: the watches stay open.
	digest := "sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	p, err := st.OpenPartial(digest, 2*pieceSize, pieceSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Release)
	srv, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	NewServer(st, nil, 4, zaptest.NewLogger(t)).RegisterWatch(srv)
	client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: srv.ID(), Addrs: srv.Addrs()}); err != nil {
		t.Fatal(err)
	}
	req := swarmproto.WatchRequest{Digest: digest, PieceSize: pieceSize}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type watch struct {
		cancel context.CancelFunc
		ended  chan error
	}
	var open []watch
	for range MaxWatchers {
		wctx, wcancel := context.WithCancel(ctx)
		first := make(chan struct{}, 1)
		w := watch{cancel: wcancel, ended: make(chan error, 1)}
		go func() { w.ended <- Watch(wctx, client, srv.ID(), req, 2, func([]byte) { first <- struct{}{} }) }()
		select {
		case <-first: // admitted: the first bitmap came
		case err := <-w.ended:
			t.Fatalf("watch %d of %d ended: %v", len(open)+1, MaxWatchers, err)
		}
		open = append(open, w)
	}
	err = Watch(ctx, client, srv.ID(), req, 2, func([]byte) { t.Error("a watcher past the bound got news") })
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("watcher %d: %v, want ErrBusy", MaxWatchers+1, err)
	}
	// One watcher leaves; the server notices when it next writes to it.
	open[0].cancel()
	if err := <-open[0].ended; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled watch: %v", err)
	}
	data := make([]byte, pieceSize)
	rand.Read(data)
	if err := p.WritePiece(0, data); err != nil {
		t.Fatal(err)
	}
	got := make(chan struct{}, 4)
	deadline := time.Now().Add(20 * time.Second)
	for {
		wctx, wcancel := context.WithCancel(ctx)
		ended := make(chan error, 1)
		go func() { ended <- Watch(wctx, client, srv.ID(), req, 2, func([]byte) { got <- struct{}{} }) }()
		select {
		case <-got:
			wcancel()
			<-ended
			for _, w := range open[1:] {
				w.cancel()
				<-w.ended
			}
			return
		case err := <-ended:
			wcancel()
			if !errors.Is(err, ErrBusy) || time.Now().After(deadline) {
				t.Fatalf("watch after one left: %v, want admitted", err)
			}
		}
	}
}
