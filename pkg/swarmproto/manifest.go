package swarmproto

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/libp2p/go-libp2p/core/protocol"
)

// ManifestProtocol resolves tags and fetches manifests through the
// supernode that owns an image: one ManifestRequest and one
// ManifestResponse per stream.
const ManifestProtocol protocol.ID = "/starling/manifest/1"

// Size caps of the manifest protocol. A manifest body is at most
// MaxManifestBytes (the distribution spec's recommended limit); JSON
// carries it as base64, 4/3 of that, plus the other fields.
const (
	MaxManifestBytes         = 4 << 20
	MaxManifestRequestBytes  = 32 << 10
	MaxManifestResponseBytes = MaxManifestBytes/3*4 + 64<<10
	maxAuthorizationBytes    = 16 << 10
	maxMediaTypeBytes        = 255
)

var (
	tagPattern = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	// A media type as upstream sent it in Content-Type, parameters included.
	mediaTypePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(?:\s*;[ -~]*)?$`)
)

// ManifestRequest asks for the manifest a tag currently names, or for a
// manifest by digest, in a repository of a registry.
type ManifestRequest struct {
	Registry string `json:"registry"`
	Repo     string `json:"repo"`
	// Ref is a tag or a sha256 digest.
	Ref string `json:"ref"`
	// Authorization is the client's header; empty for a client that sent
	// none. The supernode answers only what upstream gives these
	// credentials.
	Authorization string `json:"authorization,omitempty"`
}

// IsDigest reports whether the request names a digest rather than a tag.
func (r *ManifestRequest) IsDigest() bool { return strings.HasPrefix(r.Ref, "sha256:") }

// Validate checks a request read from the network.
func (r *ManifestRequest) Validate() error {
	if !hostPattern.MatchString(r.Registry) || len(r.Registry) > 255 {
		return fmt.Errorf("bad registry %q", r.Registry)
	}
	if !repoPattern.MatchString(r.Repo) || len(r.Repo) > 255 {
		return fmt.Errorf("bad repository %q", r.Repo)
	}
	if !sha256Digest.MatchString(r.Ref) && !tagPattern.MatchString(r.Ref) {
		return fmt.Errorf("bad reference %q", r.Ref)
	}
	if len(r.Authorization) > maxAuthorizationBytes {
		return errors.New("authorization too long")
	}
	return nil
}

// ManifestResponse answers a ManifestRequest: the manifest and its digest,
// or an error with upstream's HTTP status.
type ManifestResponse struct {
	Error string `json:"error,omitempty"`
	// Status is upstream's HTTP status when it refused or failed (401,
	// 404, 503...); 0 when the supernode itself could not get an answer.
	Status    int    `json:"status,omitempty"`
	Digest    string `json:"digest,omitempty"`
	MediaType string `json:"media_type,omitempty"`
	Body      []byte `json:"body,omitempty"`
	// Stale says upstream was unavailable and the answer is the digest the
	// tag had when the cluster last resolved it.
	Stale bool `json:"stale,omitempty"`
}

// Validate checks a response read from the network against the request it
// answers: the body must hash to the digest, and a digest request must get
// that digest.
func (r *ManifestResponse) Validate(req *ManifestRequest) error {
	if r.Error != "" {
		if len(r.Body) > 0 || r.Digest != "" {
			return errors.New("error answer with a manifest")
		}
		if r.Status != 0 && (r.Status < 400 || r.Status > 599) {
			return fmt.Errorf("bad error status %d", r.Status)
		}
		return nil
	}
	if !sha256Digest.MatchString(r.Digest) {
		return fmt.Errorf("bad digest %q", r.Digest)
	}
	if req.IsDigest() && r.Digest != req.Ref {
		return fmt.Errorf("asked for %s, got %s", req.Ref, r.Digest)
	}
	if len(r.Body) == 0 || len(r.Body) > MaxManifestBytes {
		return fmt.Errorf("manifest of %d bytes", len(r.Body))
	}
	sum := sha256.Sum256(r.Body)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != r.Digest {
		return fmt.Errorf("manifest hashes to %s, not %s", got, r.Digest)
	}
	if r.MediaType != "" && (len(r.MediaType) > maxMediaTypeBytes || !mediaTypePattern.MatchString(r.MediaType)) {
		return fmt.Errorf("bad media type %q", r.MediaType)
	}
	if r.Stale && req.IsDigest() {
		return errors.New("stale answer to a digest request")
	}
	return nil
}
