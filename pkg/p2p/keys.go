package p2p

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// LoadOrCreateIdentity returns the private key stored at path, creating a new
// Ed25519 key there (mode 0600, parent directories 0700) if the file does not
// exist. Creation is atomic: the key is written to a temporary file and
// linked into place, so a crash never leaves a half-written key and two
// processes racing on the same path end up with the same identity.
func LoadOrCreateIdentity(path string) (crypto.PrivKey, error) {
	key, err := loadIdentity(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	if err := createIdentity(path); err != nil {
		return nil, err
	}
	return loadIdentity(path)
}

func loadIdentity(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read identity: %w", err)
	}
	key, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, explainIdentity(path, b, err)
	}
	return key, nil
}

func createIdentity(path string) error {
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate identity: %w", err)
	}
	b, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode identity: %w", err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create identity directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".identity-*") // created with mode 0600
	if err != nil {
		return fmt.Errorf("create identity: %w", err)
	}
	defer os.Remove(tmp.Name()) // the link below keeps the key if it succeeds
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write identity %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync identity %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close identity %s: %w", tmp.Name(), err)
	}
	// Link, unlike rename, fails if path exists: whoever links first wins
	// and everyone else loads that key.
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("install identity %s: %w", path, err)
	}
	return nil
}

// PeerIDFromIdentity returns the peer ID of the identity at path, creating
// the identity if absent.
func PeerIDFromIdentity(path string) (peer.ID, error) {
	key, err := LoadOrCreateIdentity(path)
	if err != nil {
		return "", err
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return "", fmt.Errorf("peer ID of identity %s: %w", path, err)
	}
	return id, nil
}

// GenerateSwarmKey writes a new random swarm key in the standard
// go-libp2p/IPFS format.
func GenerateSwarmKey(w io.Writer) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("generate swarm key: %w", err)
	}
	if _, err := fmt.Fprintf(w, "/key/swarm/psk/1.0.0/\n/base16/\n%s\n", hex.EncodeToString(key)); err != nil {
		return fmt.Errorf("write swarm key: %w", err)
	}
	return nil
}

// LoadSwarmKey reads a swarm key file as written by GenerateSwarmKey (the
// /base64/ and /bin/ encodings of the same format are accepted too).
func LoadSwarmKey(path string) (pnet.PSK, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read swarm key: %w", err)
	}
	defer f.Close()
	psk, err := pnet.DecodeV1PSK(f)
	if err != nil {
		return nil, fmt.Errorf("swarm key %s is malformed (want \"/key/swarm/psk/1.0.0/\", \"/base16/\", 64 hex digits): %w", path, err)
	}
	return psk, nil
}
