package seed

import (
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"go.uber.org/zap/zaptest"

	"github.com/starling-oci/starling/internal/testregistry"
	"github.com/starling-oci/starling/pkg/piece"
	"github.com/starling-oci/starling/pkg/store"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
)

// stuckPublisher is a tracker that does not take piece CIDs until released.
type stuckPublisher struct {
	release chan struct{}
	done    chan struct{}
}

func (p *stuckPublisher) SetSize(string, int64, int64)        {}
func (p *stuckPublisher) AddPiece(string, int, cid.Cid)       { <-p.release }
func (p *stuckPublisher) SetSeedHave(string, []byte)          {}
func (p *stuckPublisher) Fail(string, error, int)             { close(p.done) }
func (p *stuckPublisher) SetMetainfo(*piece.Metainfo, []byte) { close(p.done) }

// The seed's upstream read never waits on the tracker: with a tracker that
// takes no piece CIDs at all, the whole blob is still read from upstream.
// Fails when AddPiece is called on the read path (the read stops after the
// first piece, once the socket buffers are full).
func TestUpstreamReadDoesNotWaitOnTheTracker(t *testing.T) {
	up := testregistry.New(t)
	img := up.Push(t, "app:v1", 1, 32<<20)
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	regs, client, err := upstream.Open([]string{up.URL()}, upstream.Options{}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(store.Options{Dir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pub := &stuckPublisher{release: make(chan struct{}), done: make(chan struct{})}
	s := New(st, client, regs, pub, 64<<10, time.Minute, zaptest.NewLogger(t))
	defer s.Close()
	up.Reset()
	s.Ensure(swarmproto.TrackerRequest{Op: swarmproto.OpPoll, Digest: d.String(), Registry: up.Host(), Repo: "app", Want: -1})

	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for up.Egress() < size {
		select {
		case <-tick.C:
		case <-deadline:
			close(pub.release)
			t.Fatalf("upstream sent %d of %d bytes while the tracker was stuck", up.Egress(), size)
		}
	}
	close(pub.release)
	<-pub.done
}
