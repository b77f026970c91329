package p2p

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strings"

	"go.uber.org/zap"
)

// ExplainDialError turns a libp2p dial failure into what an operator should
// check. The misconfigurations it names are the ones libp2p reports only as
// protocol internals: a swarm key that differs (the membership proof fails:
// ErrNotMember, or the peer closes the connection on ours; the peer speaks
// another security protocol because it has no key or is of an older
// release: "protocols not supported"; with --pnet the peers' ciphers
// disagree, so the handshake reads noise: "message did not have trailing
// newline", "incoming message was too large", or each waits for the other
// until the handshake times out), and a peer ID that does not
// match the one configured. Anything else is returned as is.
func ExplainDialError(err error) string {
	if err == nil {
		return ""
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "peer id mismatch") || strings.Contains(msg, "peer IDs don't match"):
		return "another peer ID answers at that address: the peer's identity changed (a supernode started without --identity gets a new peer ID each start; pin --identity and update --supernode)"
	case strings.Contains(msg, ErrProofTimeout.Error()):
		return "timed out in the membership proof: the peer answered the handshake but not the proof in time (an overloaded peer or machine, not a key mismatch)"
	case strings.Contains(msg, ErrNotMember.Error()) ||
		strings.Contains(msg, "failed to negotiate security protocol") &&
			(strings.Contains(msg, "trailing newline") || strings.Contains(msg, "message was too large") ||
				strings.Contains(msg, "protocols not supported") || strings.Contains(msg, "deadline exceeded") ||
				strings.Contains(msg, "EOF") || strings.Contains(msg, "connection reset")):
		return "the swarm keys differ: the peer answered, but not with this --swarm-key (or it has none, or another --pnet setting, or it is not a Starling node of this release)"
	case strings.Contains(msg, "connection refused"):
		return "connection refused: nothing listens at that address"
	case strings.Contains(msg, "i/o timeout") || strings.Contains(msg, "context deadline exceeded"):
		return "timed out: the address is not reachable from here"
	}
	return msg
}

// ErrKeyExists is returned by WriteSwarmKeyFile for a path that exists.
var ErrKeyExists = errors.New("file exists")

// WriteSwarmKeyFile writes a new swarm key to path with mode 0600. It never
// overwrites: replacing a swarm's key by accident cuts every node off.
func WriteSwarmKeyFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("write swarm key: %s: %w (remove it first to replace the swarm's key)", path, ErrKeyExists)
	}
	if err != nil {
		return fmt.Errorf("write swarm key: %w", err)
	}
	if err := GenerateSwarmKey(f); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write swarm key %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write swarm key %s: %w", path, err)
	}
	return nil
}

// warnIfReadable logs a warning when a secret key file can be read by
// other local users (group or world read bits).
func warnIfReadable(log *zap.Logger, path, what string) {
	fi, err := os.Stat(path)
	if err != nil {
		return // reading it reports the error
	}
	if perm := fi.Mode().Perm(); perm&0o044 != 0 {
		log.Warn(what+" file is readable by other users: anyone who reads it can "+readableRisk[what],
			zap.String("file", path), zap.String("mode", fmt.Sprintf("%04o", perm)), zap.String("fix", "chmod 600 "+path))
	}
}

var readableRisk = map[string]string{
	"swarm key": "join the swarm",
	"identity":  "impersonate this node",
}

var swarmKeyHeader = regexp.MustCompile(`^\s*/key/swarm/psk/`)

// explainIdentity says what an identity file should be when path holds
// something else.
func explainIdentity(path string, b []byte, err error) error {
	const want = "want a libp2p private key file as `starling id FILE` creates, named by --identity"
	if swarmKeyHeader.Match(b) {
		return fmt.Errorf("%s is a swarm key, not an identity (%s; the swarm key goes to --swarm-key)", path, want)
	}
	return fmt.Errorf("%s is not a libp2p identity (%s): %w", path, want, err)
}
