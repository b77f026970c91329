package swarm_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/starling-oci/starling/internal/testregistry"
)

// BenchmarkSixAgents256MiB pulls one 256 MiB image (4 layers) on six
// in-process agents at once through one supernode, then the same image
// with six direct pulls from the registry, in one run. It reports the time
// of the slowest node for each and the registry's egress per unique blob
// byte. Run with -benchtime 1x.
func BenchmarkSixAgents256MiB(b *testing.B) {
	for _, limit := range []int64{0, 100 << 20} {
		name := "registry-unlimited"
		if limit > 0 {
			name = fmt.Sprintf("registry-%dMiBps", limit>>20)
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				benchSixAgents(b, limit)
			}
		})
	}
}

func benchSixAgents(b *testing.B, limit int64) {
	const nodes = 6
	up := testregistry.New(b)
	img := up.Push(b, "big/app:v1", 4, 64<<20)
	up.LimitEgress(limit)
	unique := float64(blobBytes(b, img))

	key := swarmKey(b)
	sn := startSupernode(b, key, up.URL(), 0)
	var mirrors []string
	for range nodes {
		mirrors = append(mirrors, startAgent(b, key, up.URL(), sn.Addrs(), nil).srv.URL)
	}
	start := time.Now()
	pullConcurrently(b, mirrors, "big/app:v1")
	p2p := time.Since(start)
	p2pEgress := float64(up.Egress())

	up.Reset()
	direct := make([]string, nodes)
	for i := range direct {
		direct[i] = up.URL()
	}
	start = time.Now()
	pullConcurrently(b, direct, "big/app:v1")
	directTime := time.Since(start)
	directEgress := float64(up.Egress())

	b.ReportMetric(p2p.Seconds(), "p2p-s")
	b.ReportMetric(directTime.Seconds(), "direct-s")
	b.ReportMetric(p2pEgress/unique, "p2p-egress/blob-bytes")
	b.ReportMetric(directEgress/unique, "direct-egress/blob-bytes")
}

func pullConcurrently(b *testing.B, mirrors []string, repoTag string) {
	var wg sync.WaitGroup
	errs := make(chan error, len(mirrors))
	for _, m := range mirrors {
		wg.Go(func() {
			if err := pull(m, repoTag); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}
