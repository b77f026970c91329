// Package swarmproto defines the messages agents and supernodes exchange
// over libp2p, and checks every field that arrives from the network.
//
// Three protocols:
//   - /starling/tracker/2: poll (join a blob's swarm, learn its pieces and
//     peers), have (report progress), withdraw (no longer hold a blob),
//     permit and release (bounded back-to-source). Every answer comes at
//     once and says when to ask again (interval_ms).
//   - /starling/piece/1: PieceRequest, answered by a PieceHeader followed by
//     exactly Size raw bytes.
//   - /starling/watch/1: WatchRequest, answered by a stream of WatchNews:
//     a peer's bitmap of a blob each time it grows, so its neighbours learn
//     of new pieces at once rather than at their next tracker poll.
package swarmproto

import (
	"errors"
	"fmt"
	"regexp"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/starling-oci/starling/pkg/piece"
)

// Protocol IDs.
const (
	TrackerProtocol protocol.ID = "/starling/tracker/2"
	PieceProtocol   protocol.ID = "/starling/piece/1"
	WatchProtocol   protocol.ID = "/starling/watch/1"
)

// Size caps for framed messages.
const (
	MaxRequestBytes  = 64 << 10
	MaxResponseBytes = 4 << 20
	MaxPeers         = 64
	maxAddrs         = 16
	maxPieces        = 1 << 20 // 4 TiB at 4 MiB pieces
	// MaxFailed bounds the failure reports one request carries.
	MaxFailed = 32
	// MaxIntervalMillis caps the poll interval a tracker may ask for.
	MaxIntervalMillis = 60_000
)

// Tracker operations.
const (
	OpPoll = "poll"
	OpHave = "have"
	// OpWithdraw says the sender no longer holds the blob (evicted or
	// quarantined): it is dropped from the blob's swarm.
	OpWithdraw = "withdraw"
	// OpPermit asks the owning supernode for a back-to-source permit: a
	// lease to fetch the blob's missing pieces from upstream. Only a few
	// are granted per blob at a time; the others keep using the swarm.
	OpPermit = "permit"
	// OpRelease hands a permit back before its lease ends.
	OpRelease = "release"
)

var (
	sha256Digest = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
	hostPattern  = regexp.MustCompile(`^[a-z0-9.-]+(:[0-9]{1,5})?$`)
	repoPattern  = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
)

// TrackerRequest is what an agent sends to a supernode.
type TrackerRequest struct {
	Op     string `json:"op"`
	Digest string `json:"digest"`
	// Registry (the host clients name), Repo and Authorization tell the
	// seed where to fetch the blob and with whose credentials.
	Registry      string `json:"registry,omitempty"`
	Repo          string `json:"repo,omitempty"`
	Authorization string `json:"authorization,omitempty"`
	// Addrs are the sender's dialable multiaddrs (without /p2p).
	Addrs []string `json:"addrs,omitempty"`
	// Have is the sender's piece bitmap once it knows the piece count.
	Have []byte `json:"have,omitempty"`
	// Known is how many piece CIDs the sender already has; the response
	// carries only the ones after it.
	Known int `json:"known,omitempty"`
	// Starved says the sender has had nothing to download for a while
	// (its peers are gone, busy or bad): the tracker may offer it seed
	// pieces already on offer to one other peer (never the whole seed).
	Starved bool `json:"starved,omitempty"`
	// Want is the piece a client of the sender is blocked on, or -1: the
	// tracker offers the seed's copy of it and the next few at once, so
	// the HTTP response streams in order.
	Want int `json:"want"`
	// Failed reports claimed pieces their holder did not serve: the
	// tracker stops counting those claims, and offers the seed's copy once
	// every claimed holder of a piece has failed.
	Failed []Failure `json:"failed,omitempty"`
}

// Failure is one claimed piece a peer did not serve.
type Failure struct {
	Peer  string `json:"peer"`
	Piece int    `json:"piece"`
	// Corrupt: the peer sent bytes that failed the piece's CID, not
	// "piece not available" or a dead connection. The tracker drops the
	// peer from the blob's swarm.
	Corrupt bool `json:"corrupt,omitempty"`
}

// Validate checks a request read from the network.
func (r *TrackerRequest) Validate() error {
	switch r.Op {
	case OpPoll, OpHave, OpWithdraw, OpPermit, OpRelease:
	default:
		return fmt.Errorf("unknown op %q", r.Op)
	}
	if !sha256Digest.MatchString(r.Digest) {
		return fmt.Errorf("bad digest %q", r.Digest)
	}
	if r.Op == OpPoll {
		if !hostPattern.MatchString(r.Registry) || len(r.Registry) > 255 {
			return fmt.Errorf("bad registry %q", r.Registry)
		}
		if !repoPattern.MatchString(r.Repo) || len(r.Repo) > 255 {
			return fmt.Errorf("bad repository %q", r.Repo)
		}
	}
	if len(r.Authorization) > 16<<10 {
		return errors.New("authorization too long")
	}
	if r.Want < -1 || r.Want >= maxPieces {
		return fmt.Errorf("bad wanted piece %d", r.Want)
	}
	if r.Known < 0 || r.Known > maxPieces {
		return fmt.Errorf("bad known count %d", r.Known)
	}
	if len(r.Addrs) > maxAddrs {
		return fmt.Errorf("%d addresses, at most %d", len(r.Addrs), maxAddrs)
	}
	for _, a := range r.Addrs {
		if _, err := ma.NewMultiaddr(a); err != nil {
			return fmt.Errorf("bad address %q: %w", a, err)
		}
	}
	if len(r.Have) > maxPieces/8 {
		return errors.New("bitmap too long")
	}
	if len(r.Failed) > MaxFailed {
		return fmt.Errorf("%d failure reports, at most %d", len(r.Failed), MaxFailed)
	}
	for _, f := range r.Failed {
		if f.Piece < 0 || f.Piece >= maxPieces {
			return fmt.Errorf("bad failed piece %d", f.Piece)
		}
		if len(f.Peer) > 128 {
			return errors.New("failed peer ID too long")
		}
	}
	return nil
}

// PeerInfo is one peer in a tracker response.
type PeerInfo struct {
	ID    string   `json:"id"`
	Addrs []string `json:"addrs"`
	Have  []byte   `json:"have"`
	Seed  bool     `json:"seed,omitempty"` // the supernode itself
}

// TrackerResponse answers a TrackerRequest.
type TrackerResponse struct {
	Error string `json:"error,omitempty"`
	// Status is the upstream's HTTP status when the seed's fetch failed
	// (401, 404...), so the agent can tell a refusal from an outage.
	Status  int    `json:"status,omitempty"`
	Version uint64 `json:"version"`
	// Size is -1 until the seed has the upstream's response headers.
	Size      int64 `json:"size"`
	PieceSize int64 `json:"piece_size"`
	// Pieces are CIDs from index Known (of the request) on.
	Pieces []string   `json:"pieces,omitempty"`
	Peers  []PeerInfo `json:"peers,omitempty"`
	// Interval (milliseconds) is the earliest the sender may send its next
	// request for this blob. It grows with the swarm, so the tracker's
	// load stays bounded whatever the number of agents.
	Interval int64 `json:"interval_ms"`
	// Permit answers OpPermit: granted for PermitTTL milliseconds.
	Permit    bool  `json:"permit,omitempty"`
	PermitTTL int64 `json:"permit_ttl_ms,omitempty"`
}

// Validate checks a response read from the network against the request
// it answers.
func (r *TrackerResponse) Validate(req *TrackerRequest) error {
	if r.Error != "" {
		return nil
	}
	if r.Size < -1 {
		return fmt.Errorf("bad size %d", r.Size)
	}
	if r.Size >= 0 {
		if r.PieceSize < piece.MinSize || r.PieceSize > piece.MaxSize {
			return fmt.Errorf("bad piece size %d", r.PieceSize)
		}
		if n := piece.Count(r.Size, r.PieceSize); req.Known+len(r.Pieces) > n {
			return fmt.Errorf("%d piece CIDs for %d pieces", req.Known+len(r.Pieces), n)
		}
	} else if len(r.Pieces) > 0 {
		return errors.New("piece CIDs without a size")
	}
	for _, s := range r.Pieces {
		if _, err := ParseCID(s); err != nil {
			return err
		}
	}
	if len(r.Peers) > MaxPeers {
		return fmt.Errorf("%d peers, at most %d", len(r.Peers), MaxPeers)
	}
	if r.Interval < 0 || r.Interval > MaxIntervalMillis || r.PermitTTL < 0 {
		return fmt.Errorf("bad interval %d ms or permit lease %d ms", r.Interval, r.PermitTTL)
	}
	for _, p := range r.Peers {
		if len(p.Addrs) > maxAddrs || len(p.Have) > maxPieces/8 {
			return fmt.Errorf("peer %s: too many addresses or bitmap too long", p.ID)
		}
	}
	return nil
}

// ParseCID parses a piece CID and checks it is one we produce.
func ParseCID(s string) (cid.Cid, error) {
	c, err := cid.Decode(s)
	if err != nil {
		return cid.Undef, fmt.Errorf("bad piece CID %q: %w", s, err)
	}
	if err := piece.Verify(c, nil); err != nil && !errors.Is(err, piece.ErrMismatch) {
		return cid.Undef, fmt.Errorf("piece CID %q: %w", s, err)
	}
	return c, nil
}

// PieceRequest asks a peer for one piece.
type PieceRequest struct {
	Digest    string `json:"digest"`
	PieceSize int64  `json:"piece_size"`
	Index     int    `json:"index"`
}

// Validate checks a request read from the network.
func (r *PieceRequest) Validate() error {
	if !sha256Digest.MatchString(r.Digest) {
		return fmt.Errorf("bad digest %q", r.Digest)
	}
	if r.Index < 0 || r.Index >= maxPieces {
		return fmt.Errorf("bad piece index %d", r.Index)
	}
	if r.PieceSize < piece.MinSize || r.PieceSize > piece.MaxSize {
		return fmt.Errorf("bad piece size %d", r.PieceSize)
	}
	return nil
}

// WatchRequest asks a peer to stream its bitmap of one blob as it grows:
// the peer answers with WatchNews messages, one per change (coalesced),
// until it holds the whole blob.
type WatchRequest struct {
	Digest    string `json:"digest"`
	PieceSize int64  `json:"piece_size"`
}

// Validate checks a request read from the network.
func (r *WatchRequest) Validate() error {
	if !sha256Digest.MatchString(r.Digest) {
		return fmt.Errorf("bad digest %q", r.Digest)
	}
	if r.PieceSize < piece.MinSize || r.PieceSize > piece.MaxSize {
		return fmt.Errorf("bad piece size %d", r.PieceSize)
	}
	return nil
}

// WatchNews is one message of a watch: the peer's current bitmap, or why
// it will not send any (busy: too many watchers; not available).
type WatchNews struct {
	Have  []byte `json:"have,omitempty"`
	Error string `json:"error,omitempty"`
}

// PieceHeader precedes a piece's bytes; Size is 0 and Error set when the
// peer cannot serve it.
type PieceHeader struct {
	Size  int64  `json:"size"`
	Error string `json:"error,omitempty"`
	// Have is the server's current bitmap of the blob (also on busy and
	// unavailable answers), so the requester learns what it holds now
	// without asking the tracker. Absent from older servers.
	Have []byte `json:"have,omitempty"`
}

// ParseAddrs turns peer addresses from a response into multiaddrs,
// skipping bad ones.
func ParseAddrs(addrs []string) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, s := range addrs {
		if a, err := ma.NewMultiaddr(s); err == nil {
			out = append(out, a)
		}
	}
	return out
}
