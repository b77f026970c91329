package swarm

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/starling-oci/starling/pkg/ocierr"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/wire"
	"github.com/starling-oci/starling/registryproxy"
)

// trackerClient talks to the supernode that owns one blob. It paces polls
// and haves by the interval the tracker asks for, so the tracker's load
// stays bounded however many agents share the blob.
type trackerClient struct {
	host host.Host
	peer peer.ID
	req  registryproxy.BlobRequest

	// timeout is how often a pending exchange checks that the supernode is
	// still connected (rpcTimeout when zero); patience bounds how long one
	// exchange waits for its answer while it is (slowTracker when zero);
	// deadAfter is how long a connected supernode may go without answering
	// anything before it counts as lost (deadTracker when zero).
	timeout, patience, deadAfter time.Duration

	mu       sync.Mutex
	next     time.Time // earliest time of the next paced request
	answered time.Time // last answer, or the first request until one came
}

// rpcTimeout is how often a pending tracker exchange checks that the
// supernode is still connected.
const rpcTimeout = 10 * time.Second

// slowTracker bounds one exchange on a live connection. A CPU-starved
// supernode answers late, not never: an exchange waits for its answer on
// the same stream rather than asking again (which would throw away the
// work the supernode has done on it, and at a queue longer than the
// timeout, every answer).
const slowTracker = time.Minute

// deadTracker is how long a supernode we are still connected to may go
// without answering anything before the agent counts it as lost. Until
// then a late answer is a slow supernode: going to the registry because of
// it would multiply the registry's load (the download keeps going with the
// peers it knows, and a stalled one asks for a permit as always).
const deadTracker = 5 * time.Minute

// alive reports whether this host still holds a connection to the
// supernode.
func (t *trackerClient) alive() bool {
	return t.host.Network().Connectedness(t.peer) == network.Connected
}

// slow reports whether err is a late answer from a supernode that is
// still connected and answered within deadTracker: slow, not lost.
func (t *trackerClient) slow(err error) bool {
	if !errors.Is(err, errLate) || !t.alive() {
		return false
	}
	dead := t.deadAfter
	if dead <= 0 {
		dead = deadTracker
	}
	t.mu.Lock()
	last := t.answered
	t.mu.Unlock()
	return time.Since(last) < dead
}

// pace waits until the tracker's interval since the last paced request
// has passed.
func (t *trackerClient) pace(ctx context.Context) error {
	t.mu.Lock()
	wait := time.Until(t.next)
	t.mu.Unlock()
	if wait <= 0 {
		return nil
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// paced sends r once the interval allows and records the next one.
func (t *trackerClient) paced(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, error) {
	if err := t.pace(ctx); err != nil {
		return nil, err
	}
	resp, iv, err := t.exchange(ctx, r)
	t.mu.Lock()
	t.next = time.Now().Add(iv)
	t.mu.Unlock()
	return resp, err
}

func (t *trackerClient) call(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, error) {
	resp, _, err := t.exchange(ctx, r)
	return resp, err
}

// exchange sends r and returns the answer and the interval the tracker
// asked for (a short one when it could not be reached).
func (t *trackerClient) exchange(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, time.Duration, error) {
	t.mu.Lock()
	if t.answered.IsZero() {
		t.answered = time.Now() // the grace of a supernode not yet asked
	}
	t.mu.Unlock()
	resp, err := t.roundTrip(ctx, r)
	if resp == nil {
		return nil, minInterval, err
	}
	t.mu.Lock()
	t.answered = time.Now()
	t.mu.Unlock()
	return resp, max(minInterval, time.Duration(resp.Interval)*time.Millisecond), err
}

// errLate marks an exchange cut off by its timeout.
var errLate = errors.New("no answer in time")

// minInterval is the least time between paced requests whatever the
// tracker says (and after a failed exchange).
const minInterval = 100 * time.Millisecond

// errGone ends an exchange whose supernode connection dropped.
var errGone = errors.New("connection to the supernode lost")

// roundTrip sends r on a new stream and waits for the answer for up to
// patience, as long as the supernode stays connected (checked every
// timeout).
func (t *trackerClient) roundTrip(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, error) {
	r.Digest = t.req.Digest
	timeout, patience := t.timeout, t.patience
	if timeout <= 0 {
		timeout = rpcTimeout
	}
	if patience <= 0 {
		patience = slowTracker
	}
	parent := ctx
	ctx, cancelTimeout := context.WithTimeout(ctx, patience)
	defer cancelTimeout()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(timeout)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				if !t.alive() {
					cancel(errGone)
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	resp, err := t.roundTripCtx(ctx, r)
	// Whether the wait ran out is read before cancel(nil) ends it anyway.
	expired, cause := ctx.Err() != nil, context.Cause(ctx)
	cancel(nil)
	<-watched
	if err != nil && expired && parent.Err() == nil {
		if errors.Is(cause, errGone) {
			return resp, fmt.Errorf("%w: %w", errGone, err)
		}
		err = fmt.Errorf("%w after %v: %w", errLate, patience, err)
	}
	return resp, err
}

func (t *trackerClient) roundTripCtx(ctx context.Context, r swarmproto.TrackerRequest) (*swarmproto.TrackerResponse, error) {
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
		return &resp, &ocierr.Error{Status: status, Code: ocierr.Unavailable, Message: "seed: " + resp.Error}
	}
	return &resp, nil
}

// poll announces our state and learns new piece CIDs (after the known
// ones) and peers, once the tracker's interval has passed. failed reports
// claimed pieces their holders did not serve.
func (t *trackerClient) poll(ctx context.Context, known int, have []byte, starved bool, want int, failed []swarmproto.Failure) (*swarmproto.TrackerResponse, error) {
	resp, err := t.paced(ctx, swarmproto.TrackerRequest{
		Op: swarmproto.OpPoll, Registry: t.req.Registry.Host, Repo: t.req.Repo, Authorization: t.req.Authorization,
		Addrs: p2p.AnnounceAddrs(t.host), Have: have, Known: known, Starved: starved, Want: want, Failed: failed,
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

// have reports our bitmap once the tracker's interval has passed, or at
// once when first is set: the first piece makes us a holder the tracker
// can send others to, and that news is worth most early in a storm (it
// is one request per agent and blob, so the tracker's load stays bounded).
func (t *trackerClient) have(ctx context.Context, have []byte, failed []swarmproto.Failure, first bool) error {
	r := swarmproto.TrackerRequest{Op: swarmproto.OpHave, Addrs: p2p.AnnounceAddrs(t.host), Have: have, Want: -1, Failed: failed}
	var err error
	if first {
		_, err = t.call(ctx, r)
	} else {
		_, err = t.paced(ctx, r)
	}
	return err
}

// haveNow reports our bitmap at once (a complete blob: rare, one per
// agent and blob).
func (t *trackerClient) haveNow(ctx context.Context, have []byte) error {
	_, err := t.call(ctx, swarmproto.TrackerRequest{Op: swarmproto.OpHave, Addrs: p2p.AnnounceAddrs(t.host), Have: have, Want: -1})
	return err
}

// withdraw tells the tracker we no longer hold the blob.
func (t *trackerClient) withdraw(ctx context.Context) error {
	_, err := t.call(ctx, swarmproto.TrackerRequest{Op: swarmproto.OpWithdraw, Want: -1})
	return err
}

// permit asks for a back-to-source lease; false means keep using the
// swarm and ask again later.
//
// Only a supernode we cannot reach is an error (the agent then goes
// alone); one that stays connected but does not answer in time counts as
// a refusal, so the agent keeps waiting on the swarm, unless it has not
// answered anything for deadTracker.
func (t *trackerClient) permit(ctx context.Context) (bool, time.Duration, error) {
	resp, err := t.call(ctx, swarmproto.TrackerRequest{Op: swarmproto.OpPermit, Want: -1})
	if ctx.Err() == nil && t.slow(err) {
		return false, 0, nil
	}
	if err != nil {
		return false, 0, err
	}
	return resp.Permit, time.Duration(resp.PermitTTL) * time.Millisecond, nil
}

// release hands a permit back.
func (t *trackerClient) release(ctx context.Context) error {
	_, err := t.call(ctx, swarmproto.TrackerRequest{Op: swarmproto.OpRelease, Want: -1})
	return err
}

// errSlowSeed says the tracker answers but its seed has not learned the
// blob's size in time: a slow upstream, not a dead swarm.
var errSlowSeed = errors.New("seed did not learn the blob size in time")

// waitForSize polls until the seed knows the blob's size. A supernode
// that answers late is a slow seed too (errSlowSeed once limit passed).
func (t *trackerClient) waitForSize(ctx context.Context, limit time.Duration) (*swarmproto.TrackerResponse, error) {
	deadline := time.Now().Add(limit)
	for {
		resp, err := t.poll(ctx, 0, nil, false, -1, nil)
		if err != nil && ctx.Err() == nil && t.slow(err) {
			if time.Now().After(deadline) {
				return nil, errSlowSeed
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		if resp.Size >= 0 {
			return resp, nil
		}
		if time.Now().After(deadline) {
			return nil, errSlowSeed
		}
	}
}
