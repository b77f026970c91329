package swarm

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/registryproxy"
)

// trackerClient talks to the supernode that owns one blob.
type trackerClient struct {
	host host.Host
	peer peer.ID
	req  registryproxy.BlobRequest
}

// rpcTimeout bounds one tracker exchange beyond the poll's own wait.
const rpcTimeout = 10 * time.Second

func (t *trackerClient) call(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, error) {
	r.Digest = t.req.Digest
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	st, err := t.host.NewStream(ctx, t.peer, swarmproto.TrackerProtocol)
	if err != nil {
		return nil, fmt.Errorf("open tracker stream: %w", err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	if err := wire.WriteMsg(st, r); err != nil {
		st.Reset()
		return nil, fmt.Errorf("send %s: %w", r.Op, err)
	}
	var resp swarmproto.TrackerResponse
	if err := wire.ReadMsg(st, &resp, swarmproto.MaxResponseBytes); err != nil {
		st.Reset()
		return nil, fmt.Errorf("read %s answer: %w", r.Op, err)
	}
	if err := resp.Validate(&r); err != nil {
		return nil, fmt.Errorf("invalid %s answer: %w", r.Op, err)
	}
	if resp.Error != "" {
		status := resp.Status
		if status == 0 {
			status = http.StatusBadGateway
		}
		return nil, &ocierr.Error{Status: status, Code: ocierr.Unavailable, Message: "seed: " + resp.Error}
	}
	return &resp, nil
}

// poll asks for news since version, announcing our own state.
func (t *trackerClient) poll(ctx context.Context, since uint64, known int, have []byte, starved bool, want int) (*swarmproto.TrackerResponse, error) {
	return t.call(ctx, swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Registry: t.req.Registry.Host, Repo: t.req.Repo, Authorization: t.req.Authorization,
		Addrs: p2p.AnnounceAddrs(t.host), Have: have, Known: known, Since: since, Starved: starved, Want: want,
	})
}

// have reports our bitmap without waiting.
func (t *trackerClient) have(ctx context.Context, have []byte) error {
	_, err := t.call(ctx, swarmproto.TrackerRequest{Op: swarmproto.OpHave, Addrs: p2p.AnnounceAddrs(t.host), Have: have, Want: -1})
	return err
}

// waitForSize polls until the seed knows the blob's size.
func (t *trackerClient) waitForSize(ctx context.Context, limit time.Duration) (*swarmproto.TrackerResponse, error) {
	deadline := time.Now().Add(limit)
	var since uint64
	for {
		resp, err := t.poll(ctx, since, 0, nil, false, -1)
		if err != nil {
			return nil, err
		}
		if resp.Size >= 0 {
			return resp, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.New("seed did not learn the blob size in time")
		}
		since = resp.Version
	}
}
