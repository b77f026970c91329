package pieceserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/internal/cputime"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

const pieceSize = 1 << 20

// pair starts a serving host with a complete blob of n bytes and a client
// host on the same swarm key, connected.
func pair(tb testing.TB, n int, maxUploads int) (client host.Host, server peer.ID, blob []byte, digest string) {
	tb.Helper()
	srv, _, keyPath, blob, digest := serveBlob(tb, n, maxUploads, false)
	client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { client.Close() })
	if err := client.Connect(context.Background(), peer.AddrInfo{ID: srv.ID, Addrs: srv.Addrs}); err != nil {
		tb.Fatal(err)
	}
	return client, srv.ID, blob, digest
}

// keyAndStore makes a new swarm key file and an empty store.
func keyAndStore(tb testing.TB) (keyPath string, st *store.Store) {
	tb.Helper()
	dir := tb.TempDir()
	keyPath = filepath.Join(dir, "swarm.key")
	f, err := os.Create(keyPath)
	if err != nil {
		tb.Fatal(err)
	}
	if err := p2p.GenerateSwarmKey(f); err != nil {
		tb.Fatal(err)
	}
	f.Close()
	st, err = store.Open(store.Options{Dir: filepath.Join(dir, "store")}, zaptest.NewLogger(tb))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	return keyPath, st
}

// serveBlob starts a host on a new swarm key (with pnet if asked) serving
// a complete blob of n random bytes; it returns the host's address, its
// piece server, the key file, the blob and its digest.
func serveBlob(tb testing.TB, n int, maxUploads int, pnet bool) (srv peer.AddrInfo, server *Server, keyPath string, blob []byte, digest string) {
	tb.Helper()
	keyPath, st := keyAndStore(tb)
	blob = make([]byte, n)
	rand.Read(blob)
	sum := sha256.Sum256(blob)
	digest = "sha256:" + hex.EncodeToString(sum[:])
	p, err := st.OpenPartial(digest, int64(n), pieceSize)
	if err != nil {
		tb.Fatal(err)
	}
	if err := p.Append(bytes.NewReader(blob), nil); err != nil {
		tb.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		tb.Fatal(err)
	}
	p.Release()

	h, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath, PrivateNetwork: pnet}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { h.Close() })
	server = NewServer(st, nil, maxUploads, zaptest.NewLogger(tb))
	server.Register(h)
	server.RegisterWatch(h)
	return peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}, server, keyPath, blob, digest
}

func TestFetchVerifiesPieces(t *testing.T) {
	client, server, blob, digest := pair(t, 2*pieceSize+100, 4)
	buf := make([]byte, pieceSize)
	for i := range 3 {
		off, length := piece.Bounds(i, int64(len(blob)), pieceSize)
		want := blob[off : off+length]
		got, err := Fetch(context.Background(), client, server, swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: i}, length, piece.CID(want), buf, nil, nil)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("piece %d: %v", i, err)
		}
	}
	// A CID that does not match what the peer sends is a corrupt piece.
	_, err := Fetch(context.Background(), client, server, swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: 0}, pieceSize, piece.CID([]byte("other")), buf, nil, nil)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("mismatching piece: %v, want ErrCorrupt", err)
	}
	// A piece of a blob the peer does not have.
	other := "sha256:" + hex.EncodeToString(make([]byte, 32))
	_, err = Fetch(context.Background(), client, server, swarmproto.PieceRequest{Digest: other, PieceSize: pieceSize, Index: 0}, pieceSize, piece.CID(nil), buf, nil, nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("unknown blob: %v, want ErrUnavailable", err)
	}
}

// BenchmarkPieceTransfer moves 4 MiB pieces between two libp2p hosts on
// loopback (TCP, TLS 1.3 with the membership proof, yamux; with pnet
// beneath in the pnet case), verifying each. Both hosts run in this
// process, so MB/cpu-s (bytes per CPU-second of the process) is the rate a
// pair of cores would sustain per core: 500 MB/cpu-s is 1 GB/s per core pair.
func BenchmarkPieceTransfer(b *testing.B) {
	for _, pnet := range []bool{false, true} {
		name := "tls"
		if pnet {
			name = "pnet+tls"
		}
		b.Run(name, func(b *testing.B) {
			const ps = 4 << 20
			srv, _, keyPath, blob, digest := serveBlob(b, 8*ps, 8, pnet)
			client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath, PrivateNetwork: pnet}, nil)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { client.Close() })
			if err := client.Connect(context.Background(), srv); err != nil {
				b.Fatal(err)
			}
			type want struct {
				length int64
				c      cid.Cid
			}
			var pieces []want
			for i := range 8 {
				off, length := piece.Bounds(i, int64(len(blob)), ps)
				pieces = append(pieces, want{length, piece.CID(blob[off : off+length])})
			}
			buf := make([]byte, ps)
			b.SetBytes(ps)
			cpu := cputime.Start()
			for i := 0; b.Loop(); i++ {
				k := i % 8
				req := swarmproto.PieceRequest{Digest: digest, PieceSize: ps, Index: k}
				if _, err := Fetch(context.Background(), client, srv.ID, req, pieces[k].length, pieces[k].c, buf, nil, nil); err != nil {
					b.Fatal(err)
				}
			}
			cpu.Report(b, int64(b.N)*ps)
		})
	}
}
