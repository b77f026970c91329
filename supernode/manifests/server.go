package manifests

import (
	"context"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
)

// streamTimeout bounds one exchange: reading the request, the wait for
// upstream (itself bounded by Config.Timeout) and writing the answer.
const streamTimeout = 90 * time.Second

// maxErrorBytes bounds the error text sent back.
const maxErrorBytes = 1 << 10

// Register serves the manifest protocol on h.
func (s *Service) Register(h host.Host) {
	h.SetStreamHandler(swarmproto.ManifestProtocol, s.handle)
}

func (s *Service) handle(st network.Stream) {
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(streamTimeout))
	var req swarmproto.ManifestRequest
	if err := wire.ReadMsg(st, &req, swarmproto.MaxManifestRequestBytes); err != nil {
		s.log.Debug("bad manifest request", zap.Stringer("peer", st.Conn().RemotePeer()), zap.Error(err))
		st.Reset()
		return
	}
	resp := s.answer(&req)
	if err := wire.WriteMsg(st, resp); err != nil {
		s.log.Debug("send manifest answer", zap.Stringer("peer", st.Conn().RemotePeer()), zap.Error(err))
		st.Reset()
	}
}

// answer turns a request into its response; the request is validated here
// because it came from the network.
func (s *Service) answer(req *swarmproto.ManifestRequest) *swarmproto.ManifestResponse {
	if err := req.Validate(); err != nil {
		return &swarmproto.ManifestResponse{Error: "invalid request: " + err.Error(), Status: 400}
	}
	ctx, cancel := context.WithTimeout(context.Background(), streamTimeout)
	defer cancel()
	ans, err := s.Resolve(ctx, req)
	if err != nil {
		s.log.Debug("manifest request failed", zap.String("registry", req.Registry), zap.String("repo", req.Repo),
			zap.String("ref", req.Ref), zap.Error(err))
		msg := err.Error()
		if len(msg) > maxErrorBytes {
			msg = msg[:maxErrorBytes]
		}
		return &swarmproto.ManifestResponse{Error: msg, Status: errorStatus(err)}
	}
	return &swarmproto.ManifestResponse{Digest: ans.Digest, MediaType: ans.Manifest.MediaType, Body: ans.Manifest.Body, Stale: ans.Stale}
}
