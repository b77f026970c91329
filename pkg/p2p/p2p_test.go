package p2p

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
)

// TestMain fails the run if a closed host leaves goroutines behind.
// go-libp2p v0.51 shuts down cleanly with the options NewHost uses.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const echoProto = "/starling/test-echo/1"

// writeSwarmKey generates a swarm key file in dir and returns its path.
func writeSwarmKey(t *testing.T, dir, name string) string {
	t.Helper()
	var buf bytes.Buffer
	if err := GenerateSwarmKey(&buf); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// newTestHost starts a host with an echo handler and closes it at cleanup.
func newTestHost(t *testing.T, cfg Config) host.Host {
	t.Helper()
	h, err := NewHost(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("NewHost: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("close host: %v", err)
		}
	})
	h.SetStreamHandler(echoProto, func(s network.Stream) {
		defer s.Close()
		_, _ = io.Copy(s, s)
	})
	return h
}

// addrInfo returns h's addresses, keeping only those matching keep.
func addrInfo(t *testing.T, h host.Host, keep func(string) bool) peer.AddrInfo {
	t.Helper()
	info := peer.AddrInfo{ID: h.ID()}
	for _, s := range FullAddrs(h) {
		if keep(s) {
			ai, err := ParsePeerAddr(s)
			if err != nil {
				t.Fatalf("ParsePeerAddr(%s): %v", s, err)
			}
			info.Addrs = append(info.Addrs, ai.Addrs...)
		}
	}
	if len(info.Addrs) == 0 {
		t.Fatalf("host %s has no matching address in %v", h.ID(), FullAddrs(h))
	}
	return info
}

func echo(ctx context.Context, from, to host.Host) error {
	s, err := from.NewStream(ctx, to.ID(), echoProto)
	if err != nil {
		return err
	}
	defer s.Close()
	msg := []byte("hello " + to.ID().String())
	if _, err := s.Write(msg); err != nil {
		return err
	}
	if err := s.CloseWrite(); err != nil {
		return err
	}
	got, err := io.ReadAll(s)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo mismatch: " + string(got))
	}
	return nil
}

func isTCP(s string) bool   { return strings.Contains(s, "/tcp/") }
func isQUICs(s string) bool { return strings.Contains(s, "/quic-v1") }

func TestConnect(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keyA := writeSwarmKey(t, dir, "a.key")
	keyB := writeSwarmKey(t, dir, "b.key")

	tests := []struct {
		name     string
		dialer   Config
		listener Config
		addrs    func(string) bool
		wantOK   bool
	}{
		{name: "same swarm key over TCP", dialer: Config{SwarmKeyFile: keyA}, listener: Config{SwarmKeyFile: keyA}, addrs: isTCP, wantOK: true},
		{name: "open network over QUIC", addrs: isQUICs, wantOK: true},
		{name: "open network over TCP", addrs: isTCP, wantOK: true},
		{name: "same swarm key with pnet", dialer: Config{SwarmKeyFile: keyA, PrivateNetwork: true}, listener: Config{SwarmKeyFile: keyA, PrivateNetwork: true}, addrs: isTCP, wantOK: true},
		{name: "different swarm keys", dialer: Config{SwarmKeyFile: keyA}, listener: Config{SwarmKeyFile: keyB}, addrs: isTCP},
		{name: "different swarm keys with pnet", dialer: Config{SwarmKeyFile: keyA, PrivateNetwork: true}, listener: Config{SwarmKeyFile: keyB, PrivateNetwork: true}, addrs: isTCP},
		{name: "pnet on one side only", dialer: Config{SwarmKeyFile: keyA, PrivateNetwork: true}, listener: Config{SwarmKeyFile: keyA}, addrs: isTCP},
		{name: "dialer without swarm key", listener: Config{SwarmKeyFile: keyA}, addrs: isTCP},
		{name: "listener without swarm key", dialer: Config{SwarmKeyFile: keyA}, addrs: isTCP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			a := newTestHost(t, tt.dialer)
			b := newTestHost(t, tt.listener)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := a.Connect(ctx, addrInfo(t, b, tt.addrs))
			if !tt.wantOK {
				if err == nil {
					t.Fatal("Connect across networks succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			if err := echo(ctx, a, b); err != nil {
				t.Fatalf("echo: %v", err)
			}
		})
	}
}

// TestSwarm checks that a dozen private hosts on loopback can all reach each
// other, the scale our integration tests run at.
func TestSwarm(t *testing.T) {
	t.Parallel()
	key := writeSwarmKey(t, t.TempDir(), "swarm.key")
	hosts := make([]host.Host, 12)
	for i := range hosts {
		hosts[i] = newTestHost(t, Config{SwarmKeyFile: key})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i, a := range hosts {
		for _, b := range hosts[i+1:] {
			if err := a.Connect(ctx, addrInfo(t, b, isTCP)); err != nil {
				t.Fatalf("connect %s -> %s: %v", a.ID(), b.ID(), err)
			}
			if err := echo(ctx, a, b); err != nil {
				t.Fatalf("echo %s -> %s: %v", a.ID(), b.ID(), err)
			}
		}
	}
	for _, h := range hosts {
		if n := len(h.Network().Peers()); n != len(hosts)-1 {
			t.Errorf("host %s has %d peers, want %d", h.ID(), n, len(hosts)-1)
		}
	}
}

func TestNewHostConfigErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeSwarmKey(t, dir, "swarm.key")
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("not a key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	notKey := filepath.Join(dir, "garbage.identity")
	if err := os.WriteFile(notKey, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  Config
	}{
		{name: "QUIC with swarm key", cfg: Config{SwarmKeyFile: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"}}},
		{name: "malformed listen address", cfg: Config{ListenAddrs: []string{"127.0.0.1:4001"}}},
		{name: "missing swarm key file", cfg: Config{SwarmKeyFile: filepath.Join(dir, "absent.key")}},
		{name: "malformed swarm key", cfg: Config{SwarmKeyFile: bad}},
		{name: "malformed identity", cfg: Config{IdentityFile: notKey}},
		{name: "pnet without swarm key", cfg: Config{PrivateNetwork: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, err := NewHost(tt.cfg, nil)
			if err == nil {
				h.Close()
				t.Fatal("NewHost succeeded")
			}
		})
	}
}

func TestNewHostIdentityFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "id.key")
	want, err := PeerIDFromIdentity(path)
	if err != nil {
		t.Fatal(err)
	}
	h := newTestHost(t, Config{IdentityFile: path})
	if h.ID() != want {
		t.Fatalf("host ID %s, want %s from identity file", h.ID(), want)
	}
}

func TestIdentityPersistence(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "nested", "dir", "identity.key")
	first, err := PeerIDFromIdentity(path)
	if err != nil {
		t.Fatal(err)
	}
	second, err := PeerIDFromIdentity(path)
	if err != nil {
		t.Fatal(err)
	}
	if first != second {
		t.Fatalf("peer ID changed across loads: %s then %s", first, second)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("identity file mode %o, want 600", mode)
	}
	key, err := LoadOrCreateIdentity(path)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := peer.IDFromPrivateKey(key); got != first {
		t.Errorf("LoadOrCreateIdentity gives %s, want %s", got, first)
	}
	// No temporary files are left behind.
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("identity directory holds %d entries, want 1", len(entries))
	}
}

func TestIdentityConcurrentCreate(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "identity.key")
	const n = 8
	ids := make(chan peer.ID, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			id, err := PeerIDFromIdentity(path)
			ids <- id
			errs <- err
		}()
	}
	var first peer.ID
	for i := range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		id := <-ids
		if i == 0 {
			first = id
		} else if id != first {
			t.Fatalf("racing creators got different identities: %s and %s", first, id)
		}
	}
}

func TestSwarmKey(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var buf bytes.Buffer
	if err := GenerateSwarmKey(&buf); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(buf.String(), "\n")
	if len(lines) != 4 || lines[0] != "/key/swarm/psk/1.0.0/" || lines[1] != "/base16/" || len(lines[2]) != 64 || lines[3] != "" {
		t.Fatalf("generated key has unexpected format: %q", buf.String())
	}
	path := writeSwarmKey(t, dir, "ok.key")
	psk, err := LoadSwarmKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(psk) != 32 {
		t.Fatalf("key length %d, want 32", len(psk))
	}
	other, err := LoadSwarmKey(writeSwarmKey(t, dir, "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(psk, other) {
		t.Fatal("two generated keys are equal")
	}

	malformed := map[string]string{
		"empty":        "",
		"wrong header": "/key/swarm/psk/2.0.0/\n/base16/\n" + strings.Repeat("ab", 32) + "\n",
		"bad encoding": "/key/swarm/psk/1.0.0/\n/base32/\n" + strings.Repeat("ab", 32) + "\n",
		"short key":    "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.Repeat("ab", 31) + "\n",
		"not hex":      "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.Repeat("zz", 32) + "\n",
	}
	for name, content := range malformed {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadSwarmKey(p)
		if err == nil || !strings.Contains(err.Error(), "malformed") {
			t.Errorf("%s: LoadSwarmKey error = %v, want a malformed-key error", name, err)
		}
	}
}

func TestParsePeerAddr(t *testing.T) {
	t.Parallel()
	const id = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
	tests := []struct {
		in      string
		wantErr bool
	}{
		{in: "/ip4/10.0.0.1/tcp/4001/p2p/" + id},
		{in: "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/" + id},
		{in: "/dns4/supernode-0.starling/tcp/4001/p2p/" + id},
		{in: "/ip4/10.0.0.1/tcp/4001", wantErr: true},
		{in: "/p2p/" + id, wantErr: true},
		{in: "/ip4/10.0.0.1/tcp/4001/p2p/notanid", wantErr: true},
		{in: "10.0.0.1:4001", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		ai, err := ParsePeerAddr(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("ParsePeerAddr(%q) = %v, want error", tt.in, ai)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParsePeerAddr(%q): %v", tt.in, err)
			continue
		}
		if ai.ID.String() != id || len(ai.Addrs) != 1 || strings.Contains(ai.Addrs[0].String(), "/p2p/") {
			t.Errorf("ParsePeerAddr(%q) = %v", tt.in, ai)
		}
		if !strings.HasPrefix(tt.in, ai.Addrs[0].String()) {
			t.Errorf("ParsePeerAddr(%q) transport = %s", tt.in, ai.Addrs[0])
		}
	}
}

func TestFullAddrs(t *testing.T) {
	t.Parallel()
	h := newTestHost(t, Config{})
	addrs := FullAddrs(h)
	if len(addrs) != 2 {
		t.Fatalf("FullAddrs = %v, want a TCP and a QUIC address", addrs)
	}
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, id := peer.SplitAddr(a); id != h.ID() {
			t.Errorf("%s: peer ID %s, want %s", s, id, h.ID())
		}
	}
}
