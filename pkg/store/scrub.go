package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ratelimit"
)

// ErrCorrupt means a complete blob's file no longer hashes to its digest
// (bit rot, an operator's mistake). The blob has been quarantined.
var ErrCorrupt = errors.New("blob corrupt on disk")

// Verify re-hashes a complete blob (reading at most rate bytes/s; 0 is
// unlimited). A blob whose file does not match its digest is quarantined
// and Verify returns an error wrapping ErrCorrupt.
func (s *Store) Verify(ctx context.Context, digest string, rate int64) error {
	f, size, err := s.open(digest, false)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, ratelimit.New(rate).Reader(ctx, io.NewSectionReader(f, 0, size)))
	if err != nil {
		return fmt.Errorf("verify %s: %w", digest, err)
	}
	got := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if n == size && got == digest {
		return nil
	}
	err = fmt.Errorf("%w: %s hashes to %s (%d of %d bytes)", ErrCorrupt, digest, got, n, size)
	s.Quarantine(digest, err)
	return err
}

// Quarantine takes a complete blob that failed verification out of
// service: its file and record are deleted, so it is never served again
// and the next request fetches it anew, and OnRemove withdraws it from the
// swarm.
func (s *Store) Quarantine(digest string, why error) {
	s.log.Error("quarantining corrupt blob: it will be fetched again on demand", zap.String("digest", digest), zap.Error(why))
	if err := s.Delete(digest); err != nil && !errors.Is(err, ErrNotFound) {
		s.log.Warn("quarantine blob", zap.String("digest", digest), zap.Error(err))
		return
	}
	s.removed(digest)
}

// ScrubEvery is the least time between the starts of two scrub passes: a
// cache that takes less than that to re-hash (at --scrub-rate, 8 MiB/s:
// up to about 28 GiB) is re-read once per ScrubEvery, not over and over.
// Each pass still hashes every complete blob; the serve path re-hashes a
// complete blob as it is read, except on the first serve after this
// process committed it (TakeFresh).
const ScrubEvery = time.Hour

// Scrub re-hashes every complete blob, one after another, reading at most
// rate bytes/s, and quarantines those that fail, until ctx ends. A pass
// starts at most once per ScrubEvery; with nothing to check it looks again
// a minute later. rate <= 0 disables scrubbing.
//
// Without the ScrubEvery pause a small cache was re-read without end: in
// the 100-agent pull storm on two cores, every agent re-hashed its freshly
// verified 200 MiB at 8 MiB/s from the moment its blobs completed, ten
// times the rate at which it served them to its client.
func (s *Store) Scrub(ctx context.Context, rate int64) {
	if rate <= 0 {
		return
	}
	for ctx.Err() == nil {
		began := time.Now()
		blobs := s.lru("")
		checked := 0
		for _, e := range blobs {
			err := s.Verify(ctx, e.digest, rate)
			switch {
			case ctx.Err() != nil:
				return
			case err == nil, errors.Is(err, ErrCorrupt), errors.Is(err, ErrNotFound), errors.Is(err, os.ErrNotExist):
				checked++ // corrupt ones were quarantined; gone ones were evicted meanwhile
			default:
				s.log.Warn("scrub blob", zap.String("digest", e.digest), zap.Error(err))
			}
		}
		s.log.Debug("scrub pass done", zap.Int("blobs", checked))
		wait := time.Until(began.Add(ScrubEvery))
		if len(blobs) == 0 {
			wait = time.Minute
		}
		if wait <= 0 {
			continue
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}
