package agent

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/upstream"
)

// startupCheckTimeout bounds each start-up check.
const startupCheckTimeout = 10 * time.Second

// CheckConfig checks each configured registry and supernode once and logs
// one line for each: what was found (reachable, TLS or plain, auth
// required; supernode reachable with this swarm key) at info, or at warn
// what is wrong and what to change. A misconfiguration is then visible at
// start, not as pulls that quietly bypass Starling. It returns when every
// check is done or ctx ends; the agent serves meanwhile.
func (a *Agent) CheckConfig(ctx context.Context) {
	var wg sync.WaitGroup
	for _, reg := range a.regs.All() {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, startupCheckTimeout)
			defer cancel()
			upstream.LogFinding(a.log, a.up.Check(cctx, reg))
		})
	}
	for _, s := range a.supernodes {
		wg.Go(func() {
			ai, err := p2p.ParsePeerAddr(s)
			if err != nil {
				return // New has refused it already
			}
			cctx, cancel := context.WithTimeout(ctx, startupCheckTimeout)
			defer cancel()
			start := time.Now()
			err = a.host.Connect(cctx, ai)
			fields := []zap.Field{zap.String("supernode", s), zap.Duration("elapsed", time.Since(start))}
			if err != nil {
				if ctx.Err() != nil {
					return // shutting down
				}
				a.log.Warn("supernode check: FAILED, pulls will go to the registry directly",
					append(fields, zap.String("cause", p2p.ExplainDialError(err)))...)
				return
			}
			a.log.Info("supernode check: ok, reachable with this swarm key", fields...)
		})
	}
	wg.Wait()
}
