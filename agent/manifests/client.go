// Package manifests is the agent's side of /starling/manifest/1: it asks
// the supernode that owns an image for a tag's manifest or a manifest by
// digest, so the registry sees one request per image for the whole cluster
// instead of one per node. The mirror asks upstream itself when no
// supernode answers.
package manifests

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/rendezvous"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/registryproxy"
)

// rpcTimeout bounds one exchange with a supernode, its upstream wait
// included (the supernode bounds that at 30 s by default).
const rpcTimeout = 45 * time.Second

// Client implements registryproxy.ManifestSource over libp2p.
type Client struct {
	host   host.Host
	owners []string // supernode peer IDs, for rendezvous
	log    *zap.Logger
}

var _ registryproxy.ManifestSource = (*Client)(nil)

// New builds a Client on h; supernodes' addresses must be in h's peerstore.
func New(h host.Host, supernodes []peer.ID, log *zap.Logger) *Client {
	c := &Client{host: h, log: log}
	for _, id := range supernodes {
		c.owners = append(c.owners, id.String())
	}
	return c
}

// Key is what decides which supernode answers a request: the tag
// (registry, repository and tag) or the digest alone, which is content
// addressed and so shared by every repository that holds it.
func Key(registry, repo, ref string) string {
	r := swarmproto.ManifestRequest{Ref: ref}
	if r.IsDigest() {
		return ref
	}
	return registry + "/" + repo + ":" + ref
}

// Owners is the order in which an agent asks supernodes for a manifest:
// the owner of Key first, then the next ones by rendezvous, while none can
// be reached. The simulator (e2e/simulate) sends its agents' requests by it.
func Owners(registry, repo, ref string, supernodes []string) []string {
	return rendezvous.Rank(Key(registry, repo, ref), supernodes)
}

// Manifest asks the owning supernode, then the next ones in rendezvous
// order while none can be reached. A supernode's answer, refusal included,
// is final.
func (c *Client) Manifest(ctx context.Context, req registryproxy.ManifestRequest) (registryproxy.ManifestAnswer, error) {
	wreq := swarmproto.ManifestRequest{Registry: req.Registry.Host, Repo: req.Repo, Ref: req.Ref, Authorization: req.Authorization}
	var errs []error
	for _, id := range Owners(wreq.Registry, wreq.Repo, wreq.Ref, c.owners) {
		pid, err := peer.Decode(id)
		if err != nil {
			continue
		}
		resp, err := c.call(ctx, pid, &wreq)
		if err != nil {
			if ctx.Err() != nil {
				return registryproxy.ManifestAnswer{}, fmt.Errorf("ask supernodes for manifest: %w", ctx.Err())
			}
			errs = append(errs, fmt.Errorf("supernode %s: %w", pid, err))
			continue
		}
		if resp.Error != "" {
			status := resp.Status
			if status == 0 {
				status = http.StatusBadGateway
			}
			return registryproxy.ManifestAnswer{}, &ocierr.Error{Status: status, Code: ocierr.Unavailable, Message: "supernode: " + resp.Error}
		}
		return registryproxy.ManifestAnswer{
			Digest: resp.Digest, Manifest: store.Manifest{MediaType: resp.MediaType, Body: resp.Body}, Stale: resp.Stale,
		}, nil
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no supernode configured"))
	}
	return registryproxy.ManifestAnswer{}, fmt.Errorf("no supernode answered: %w", errors.Join(errs...))
}

func (c *Client) call(ctx context.Context, pid peer.ID, req *swarmproto.ManifestRequest) (*swarmproto.ManifestResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	st, err := c.host.NewStream(ctx, pid, swarmproto.ManifestProtocol)
	if err != nil {
		return nil, fmt.Errorf("open manifest stream: %w", err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	if err := wire.WriteMsg(st, req); err != nil {
		st.Reset()
		return nil, fmt.Errorf("send manifest request: %w", err)
	}
	var resp swarmproto.ManifestResponse
	if err := wire.ReadMsg(st, &resp, swarmproto.MaxManifestResponseBytes); err != nil {
		st.Reset()
		return nil, fmt.Errorf("read manifest answer: %w", err)
	}
	if err := resp.Validate(req); err != nil {
		return nil, fmt.Errorf("invalid manifest answer: %w", err)
	}
	return &resp, nil
}
