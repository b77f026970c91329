package blobcache

import (
	"context"
	"sync/atomic"
)

// Sources counts where one fill's bytes came from. The Cache puts one in
// each fill's context; fillers add to the one they find there (none: the
// calls do nothing), so the fill can be reported whole in one log line.
type Sources struct {
	upstream, peers, seed atomic.Int64
}

type sourcesKey struct{}

// WithSources returns ctx carrying s.
func WithSources(ctx context.Context, s *Sources) context.Context {
	return context.WithValue(ctx, sourcesKey{}, s)
}

// SourcesFrom returns the Sources in ctx, or nil.
func SourcesFrom(ctx context.Context) *Sources {
	s, _ := ctx.Value(sourcesKey{}).(*Sources)
	return s
}

// AddUpstream counts n bytes from the registry.
func (s *Sources) AddUpstream(n int64) {
	if s != nil {
		s.upstream.Add(n)
	}
}

// AddPeers counts n bytes from other agents.
func (s *Sources) AddPeers(n int64) {
	if s != nil {
		s.peers.Add(n)
	}
}

// AddSeed counts n bytes from a supernode's seed.
func (s *Sources) AddSeed(n int64) {
	if s != nil {
		s.seed.Add(n)
	}
}

// Split returns the bytes counted from upstream, peers and seed.
func (s *Sources) Split() (upstream, peers, seed int64) {
	return s.upstream.Load(), s.peers.Load(), s.seed.Load()
}
