package p2p

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/sec"
	tptu "github.com/libp2p/go-libp2p/p2p/net/upgrader"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	"go.uber.org/zap"
)

// MemberSecurityID is the security protocol of a swarm with a key: libp2p's
// TLS 1.3 handshake followed by the membership proof. A host that speaks
// only plain TLS or Noise fails at security negotiation.
const MemberSecurityID = "/starling/tls-member/1.0.0"

// ErrNotMember means the peer at the other end did not prove that it holds
// this swarm's key.
var ErrNotMember = errors.New("peer did not prove membership of this swarm (its swarm key differs from ours, or it has none)")

const (
	proofLen           = sha256.Size
	proofLabel         = "starling swarm membership v1" // TLS exporter label
	memberKeyInfo      = "starling membership key v1"   // HKDF info
	proofTimeout       = 10 * time.Second               // when the upgrader's context has no deadline
	roleDialer    byte = 'D'
	roleListener  byte = 'L'
)

// memberTransport secures a connection with libp2p's TLS 1.3 transport
// (mutually authenticated peer IDs, AES-GCM in hardware where the CPU has
// it) and then, before the connection is handed to the muxer and so before
// any protocol can run on it, has each side prove that it holds the swarm
// key: an HMAC, under a key derived from the swarm key, of the TLS session's
// exported keying material and both peer IDs. The proof is sent inside the
// encrypted channel, bound to this one session (a recorded proof is useless
// on any other connection) and to both identities (a member cannot relay
// it for an outsider). A side that gets a wrong proof, or none, closes the
// connection.
type memberTransport struct {
	tls   *libp2ptls.Transport
	key   []byte
	local peer.ID
	log   *zap.Logger
	bufs  coalesceBufs
}

var _ sec.SecureTransport = (*memberTransport)(nil)

// memberKey derives the HMAC key of the membership proof from the swarm key,
// so that the proof never uses the swarm key itself.
func memberKey(psk pnet.PSK) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, psk, nil, memberKeyInfo, sha256.Size)
	if err != nil {
		return nil, fmt.Errorf("derive membership key: %w", err)
	}
	return k, nil
}

// newMemberTransport returns a constructor for libp2p.Security.
func newMemberTransport(psk pnet.PSK, log *zap.Logger) (func(id protocol.ID, priv crypto.PrivKey, muxers []tptu.StreamMuxer) (*memberTransport, error), error) {
	key, err := memberKey(psk)
	if err != nil {
		return nil, err
	}
	return func(id protocol.ID, priv crypto.PrivKey, muxers []tptu.StreamMuxer) (*memberTransport, error) {
		t, err := libp2ptls.New(id, priv, muxers)
		if err != nil {
			return nil, fmt.Errorf("TLS security transport: %w", err)
		}
		local, err := peer.IDFromPrivateKey(priv)
		if err != nil {
			return nil, fmt.Errorf("TLS security transport: %w", err)
		}
		return &memberTransport{tls: t, key: key, local: local, log: log}, nil
	}, nil
}

// ID implements sec.SecureTransport.
func (t *memberTransport) ID() protocol.ID { return t.tls.ID() }

// SecureInbound implements sec.SecureTransport.
func (t *memberTransport) SecureInbound(ctx context.Context, insecure net.Conn, p peer.ID) (sec.SecureConn, error) {
	raw := newCoalescingConn(insecure, &t.bufs)
	sc, err := t.tls.SecureInbound(ctx, raw, p)
	if err != nil {
		return nil, err
	}
	if err := t.prove(ctx, sc, roleListener); err != nil {
		sc.Close()
		t.log.Warn("refused a connection: no membership proof", zap.Stringer("peer", sc.RemotePeer()),
			zap.Stringer("remote_addr", insecure.RemoteAddr()), zap.Error(err))
		return nil, err
	}
	raw.start()
	return &flushingConn{SecureConn: sc, raw: raw}, nil
}

// SecureOutbound implements sec.SecureTransport.
func (t *memberTransport) SecureOutbound(ctx context.Context, insecure net.Conn, p peer.ID) (sec.SecureConn, error) {
	raw := newCoalescingConn(insecure, &t.bufs)
	sc, err := t.tls.SecureOutbound(ctx, raw, p)
	if err != nil {
		return nil, err
	}
	if err := t.prove(ctx, sc, roleDialer); err != nil {
		sc.Close()
		t.log.Warn("dropped a connection: no membership proof", zap.Stringer("peer", sc.RemotePeer()),
			zap.Stringer("remote_addr", insecure.RemoteAddr()), zap.Error(err))
		return nil, err
	}
	raw.start()
	return &flushingConn{SecureConn: sc, raw: raw}, nil
}

// prove sends this side's proof and checks the peer's. Both sides write
// first and then read: 32 bytes fit in any socket buffer, so neither waits
// on the other.
func (t *memberTransport) prove(ctx context.Context, sc sec.SecureConn, role byte) error {
	remote := sc.RemotePeer()
	tc, ok := sc.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return fmt.Errorf("membership proof with %s: TLS transport gave a %T without a TLS connection state", remote, sc)
	}
	cs := tc.ConnectionState()
	ekm, err := cs.ExportKeyingMaterial(proofLabel, nil, 32)
	if err != nil {
		return fmt.Errorf("membership proof with %s: export keying material: %w", remote, err)
	}
	other := roleDialer
	if role == roleDialer {
		other = roleListener
	}
	mine := t.proof(ekm, role, t.local, remote)
	want := t.proof(ekm, other, remote, t.local)

	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(proofTimeout)
	}
	if err := sc.SetDeadline(deadline); err != nil {
		return fmt.Errorf("membership proof with %s: %w", remote, err)
	}
	if _, err := sc.Write(mine); err != nil {
		return fmt.Errorf("membership proof with %s: send: %w", remote, err)
	}
	got := make([]byte, proofLen)
	if _, err := io.ReadFull(sc, got); err != nil {
		return proofReadError(remote, err)
	}
	if !hmac.Equal(got, want) {
		return fmt.Errorf("membership proof with %s: %w", remote, ErrNotMember)
	}
	if err := sc.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("membership proof with %s: %w", remote, err)
	}
	return nil
}

// proof is HMAC(key, label | role | session keying material | prover | verifier).
func (t *memberTransport) proof(ekm []byte, role byte, prover, verifier peer.ID) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte(proofLabel))
	m.Write([]byte{role})
	m.Write(ekm)
	writeID := func(id peer.ID) {
		m.Write([]byte{byte(len(id) >> 8), byte(len(id))})
		m.Write([]byte(id))
	}
	writeID(prover)
	writeID(verifier)
	return m.Sum(nil)
}

// ErrProofTimeout means the peer did not send its membership proof in
// time: an overloaded peer or machine, not a foreign swarm key.
var ErrProofTimeout = errors.New("no membership proof in time (the peer or this machine is overloaded, or the link is)")

// proofReadError says why the peer's proof did not arrive. A peer with
// another key closes the connection when it reads ours, so a closed or reset
// connection means the keys differ; a deadline that passed means nothing
// about the key (seen at load ~290, where calling it "keys differ" misled).
func proofReadError(remote peer.ID, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("membership proof with %s: read: %w: %w", remote, err, ErrProofTimeout)
	}
	return fmt.Errorf("membership proof with %s: read: %w: %w", remote, err, ErrNotMember)
}
