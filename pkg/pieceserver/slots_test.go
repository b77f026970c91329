package pieceserver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// A peer that asks for a piece and never reads it cannot hold the upload
// slot: the server's writes have a per-write deadline, so the slot is free
// again soon after the stream stops draining (before: for 2 minutes every
// other peer was answered "busy").
func TestUnreadStreamDoesNotHoldTheUploadSlot(t *testing.T) {
	srv, server, keyPath, blob, digest := serveBlob(t, 2*pieceSize, 1, false)
	server.writeIdle = 300 * time.Millisecond
	client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: srv.ID, Addrs: srv.Addrs}); err != nil {
		t.Fatal(err)
	}

	// The stuck peer: takes the only slot (the header proves it) and reads
	// nothing more.
	stuck, err := client.NewStream(context.Background(), srv.ID, swarmproto.PieceProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Reset()
	if err := wire.WriteMsg(stuck, swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: 0}); err != nil {
		t.Fatal(err)
	}
	var hdr swarmproto.PieceHeader
	if err := wire.ReadMsg(stuck, &hdr, 4<<10); err != nil || hdr.Error != "" {
		t.Fatalf("stuck peer's header: %v %q", err, hdr.Error)
	}

	off, length := piece.Bounds(1, int64(len(blob)), pieceSize)
	want := blob[off : off+length]
	buf := make([]byte, pieceSize)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := Fetch(context.Background(), client, srv.ID, swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: 1},
			length, piece.CID(want), buf, nil, nil)
		if err == nil {
			return
		}
		if !errors.Is(err, ErrBusy) || time.Now().After(deadline) {
			t.Fatalf("another peer's request while a stream sits unread: %v (after %v)", err, 10*time.Second)
		}
	}
}
