package pieceserver

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/swarmproto"
)

// TestOutsiderGetsNoPiece: a host without the swarm key, or with another
// one, gets no piece, and the server sends none.
func TestOutsiderGetsNoPiece(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name     string
		otherKey bool
		pnet     bool
	}{
		{name: "no key"},
		{name: "another key", otherKey: true},
		{name: "another key, pnet", otherKey: true, pnet: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv, server, _, blob, digest := serveBlob(t, pieceSize, 4, tt.pnet)
			cfg := p2p.Config{PrivateNetwork: tt.pnet}
			if tt.otherKey {
				cfg.SwarmKeyFile = filepath.Join(t.TempDir(), "other.key")
				f, err := os.Create(cfg.SwarmKeyFile)
				if err != nil {
					t.Fatal(err)
				}
				if err := p2p.GenerateSwarmKey(f); err != nil {
					t.Fatal(err)
				}
				f.Close()
			}
			outsider, err := p2p.NewHost(cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { outsider.Close() })
			outsider.Peerstore().AddAddrs(srv.ID, srv.Addrs, time.Minute)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			buf := make([]byte, pieceSize)
			req := swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: 0}
			if _, err := Fetch(ctx, outsider, srv.ID, req, pieceSize, piece.CID(blob), buf, nil, nil); err == nil {
				t.Fatal("an outsider fetched a piece")
			}
			if n := server.BytesServed(); n != 0 {
				t.Fatalf("server sent %d piece bytes to an outsider", n)
			}
			wreq := swarmproto.WatchRequest{Digest: digest, PieceSize: pieceSize}
			if err := Watch(ctx, outsider, srv.ID, wreq, 1, func([]byte) { t.Error("an outsider got a bitmap") }); err == nil {
				t.Fatal("an outsider watched a blob")
			}
		})
	}
}

// recorder is a TCP proxy that keeps every byte it forwards.
type recorder struct {
	l    net.Listener
	to   string
	mu   sync.Mutex
	seen bytes.Buffer
	wg   sync.WaitGroup
}

func newRecorder(t *testing.T, to string) *recorder {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{l: l, to: to}
	r.wg.Go(r.serve)
	t.Cleanup(func() { l.Close(); r.wg.Wait() })
	return r
}

func (r *recorder) serve() {
	for {
		in, err := r.l.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", r.to)
		if err != nil {
			in.Close()
			continue
		}
		pipe := func(dst, src net.Conn) {
			var b [32 << 10]byte
			for {
				n, err := src.Read(b[:])
				if n > 0 {
					r.mu.Lock()
					r.seen.Write(b[:n])
					r.mu.Unlock()
					if _, werr := dst.Write(b[:n]); werr != nil {
						break
					}
				}
				if err != nil {
					break
				}
			}
			in.Close()
			out.Close()
		}
		r.wg.Go(func() { pipe(out, in) })
		r.wg.Go(func() { pipe(in, out) })
	}
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.seen.Bytes())
}

// leaks reports whether any of 256 windows of 32 bytes spread over plain
// appears in wire.
func leaks(wire, plain []byte) bool {
	const w = 32
	step := max((len(plain)-w)/256, 1)
	for off := 0; off+w <= len(plain); off += step {
		if bytes.Contains(wire, plain[off:off+w]) {
			return true
		}
	}
	return false
}

// TestPieceOnTheWireIsEncrypted reads the raw TCP bytes of piece transfers
// between two members and finds no plaintext of the pieces in them.
func TestPieceOnTheWireIsEncrypted(t *testing.T) {
	t.Parallel()
	for _, pnet := range []bool{false, true} {
		name := "TLS"
		if pnet {
			name = "pnet and TLS"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			srv, _, keyPath, blob, digest := serveBlob(t, 2*pieceSize, 4, pnet)
			var tcpAddr string
			for _, a := range srv.Addrs {
				if na, err := manet.ToNetAddr(a); err == nil && na.Network() == "tcp" {
					tcpAddr = na.String()
				}
			}
			rec := newRecorder(t, tcpAddr)
			client, err := p2p.NewHost(p2p.Config{SwarmKeyFile: keyPath, PrivateNetwork: pnet}, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			via, err := ma.NewMultiaddr("/ip4/127.0.0.1/tcp/" + portOf(t, rec.l.Addr()))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := client.Connect(ctx, peer.AddrInfo{ID: srv.ID, Addrs: []ma.Multiaddr{via}}); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, pieceSize)
			for i := range 2 {
				off, length := piece.Bounds(i, int64(len(blob)), pieceSize)
				req := swarmproto.PieceRequest{Digest: digest, PieceSize: pieceSize, Index: i}
				if _, err := Fetch(ctx, client, srv.ID, req, length, piece.CID(blob[off:off+length]), buf, nil, nil); err != nil {
					t.Fatalf("piece %d: %v", i, err)
				}
			}
			client.Close() // flush and end the proxied connection
			wire := rec.bytes()
			if len(wire) < len(blob) {
				t.Fatalf("the proxy saw %d bytes, fewer than the %d-byte blob: the transfer did not go through it", len(wire), len(blob))
			}
			if !leaks(append(bytes.Clone(wire[:1000]), blob[:1<<16]...), blob) {
				t.Fatal("the plaintext check cannot see plaintext")
			}
			if leaks(wire, blob) {
				t.Fatal("piece plaintext on the wire")
			}
			if bytes.Contains(wire, []byte(digest)) {
				t.Fatal("the requested digest is readable on the wire")
			}
		})
	}
}

func portOf(t *testing.T, a net.Addr) string {
	_, port, err := net.SplitHostPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return port
}
