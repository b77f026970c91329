package p2p

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestExplainDialError: the two misconfigurations an operator meets when
// joining a swarm are named plainly, not as libp2p internals.
func TestExplainDialError(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keyA := writeSwarmKey(t, dir, "a.key")
	keyB := writeSwarmKey(t, dir, "b.key")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	a := newTestHost(t, Config{SwarmKeyFile: keyA})
	for _, tt := range []struct {
		name string
		from host.Host
		cfg  Config
	}{
		{name: "different swarm keys", from: a, cfg: Config{SwarmKeyFile: keyB}},
		{name: "listener without a key", from: a, cfg: Config{}},
		{name: "dialer without a key", from: newTestHost(t, Config{}), cfg: Config{SwarmKeyFile: keyA}},
		{name: "pnet on the listener only", from: a, cfg: Config{SwarmKeyFile: keyA, PrivateNetwork: true}},
	} {
		b := newTestHost(t, tt.cfg)
		err := tt.from.Connect(ctx, addrInfo(t, b, isTCP))
		if got := ExplainDialError(err); !strings.Contains(got, "swarm keys differ") {
			t.Errorf("%s: ExplainDialError(%v) = %q, want it to say the swarm keys differ", tt.name, err, got)
		}
	}

	c := newTestHost(t, Config{SwarmKeyFile: keyA})
	other := newTestHost(t, Config{SwarmKeyFile: keyA})
	ai := addrInfo(t, c, isTCP)
	err := a.Connect(ctx, peer.AddrInfo{ID: other.ID(), Addrs: ai.Addrs})
	if got := ExplainDialError(err); !strings.Contains(got, "another peer ID answers") {
		t.Errorf("wrong peer ID: ExplainDialError(%v) = %q, want it to say another peer ID answers", err, got)
	}
}

func TestWriteSwarmKeyFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := WriteSwarmKeyFile(path); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("swarm key written with mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := LoadSwarmKey(path); err != nil {
		t.Fatalf("written key does not load: %v", err)
	}
	before, _ := os.ReadFile(path)
	if err := WriteSwarmKeyFile(path); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("second write over an existing key = %v, want an error saying it exists", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("an existing swarm key was overwritten")
	}
}

// TestReadableKeyFilesWarn: a key other local users can read is a secret
// given away; the host starts but says so at warn.
func TestReadableKeyFilesWarn(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeSwarmKey(t, dir, "swarm.key")
	id := filepath.Join(dir, "identity")
	if _, err := LoadOrCreateIdentity(id); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{key, id} {
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	core, logs := observer.New(zapcore.WarnLevel)
	h, err := NewHost(Config{SwarmKeyFile: key, IdentityFile: id}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, p := range []string{key, id} {
		found := false
		for _, e := range logs.All() {
			if e.ContextMap()["file"] == p && strings.Contains(e.Message, "readable") {
				found = true
			}
		}
		if !found {
			t.Errorf("no warning that %s is group/world-readable; warnings: %v", p, logs.All())
		}
	}
}

// TestIdentityOfTheWrongKindOfFile: `starling id` given a swarm key (or
// anything else) says what it wanted, and leaves the file alone.
func TestIdentityOfTheWrongKindOfFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeSwarmKey(t, dir, "swarm.key")
	junk := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(junk, []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{key: "is a swarm key", junk: "not a libp2p identity"} {
		_, err := PeerIDFromIdentity(path)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "private key") {
			t.Errorf("PeerIDFromIdentity(%s) = %v, want an error saying %q and what was expected", filepath.Base(path), err, want)
		}
	}
}

// TestProofTimeoutIsNotAKeyMismatch: a proof that did not arrive in time
// (an overloaded machine) is not reported as a foreign swarm key, while a
// peer that hangs up on our proof still is.
func TestProofTimeoutIsNotAKeyMismatch(t *testing.T) {
	t.Parallel()
	remote := peer.ID("remote")
	timeout := proofReadError(remote, fmt.Errorf("read tcp 127.0.0.1:1->127.0.0.1:2: %w", os.ErrDeadlineExceeded))
	if errors.Is(timeout, ErrNotMember) || !errors.Is(timeout, ErrProofTimeout) {
		t.Errorf("timed-out proof read = %v, want ErrProofTimeout and not ErrNotMember", timeout)
	}
	if got := ExplainDialError(timeout); strings.Contains(got, "swarm keys differ") || !strings.Contains(got, "timed out") {
		t.Errorf("ExplainDialError(%v) = %q, want a timeout, not a key mismatch", timeout, got)
	}
	for _, err := range []error{io.EOF, io.ErrUnexpectedEOF, syscall.ECONNRESET} {
		if got := proofReadError(remote, err); !errors.Is(got, ErrNotMember) {
			t.Errorf("proof read failing with %v = %v, want ErrNotMember", err, got)
		}
	}
}
