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

// Scrub re-hashes every complete blob, one after another, reading at most
// rate bytes/s, and quarantines those that fail, until ctx ends. A full
// pass is followed by the next; with nothing to check it looks again a
// minute later. rate <= 0 disables scrubbing.
func (s *Store) Scrub(ctx context.Context, rate int64) {
	if rate <= 0 {
		return
	}
	for ctx.Err() == nil {
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
		if len(blobs) == 0 {
			select {
			case <-ctx.Done():
			case <-time.After(time.Minute):
			}
		}
	}
}
