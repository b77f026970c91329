package registryproxy

import (
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"
)

// accessCache remembers which (registry, repository, credentials) upstream
// recently allowed, so cached content is only served to clients upstream
// would serve. Credentials are kept as a hash, never as they are.
type accessCache struct {
	ttl time.Duration
	now func() time.Time

	mu   sync.Mutex
	seen map[string]time.Time
}

// maxAccessEntries bounds memory against clients cycling tokens.
const maxAccessEntries = 16384

func newAccessCache(ttl time.Duration, now func() time.Time) *accessCache {
	return &accessCache{ttl: ttl, now: now, seen: map[string]time.Time{}}
}

func accessKey(registry, repo, authorization string) string {
	sum := sha256.Sum256([]byte(authorization))
	return registry + "/" + repo + "#" + hex.EncodeToString(sum[:16])
}

func (a *accessCache) allow(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.seen) >= maxAccessEntries {
		now := a.now()
		for k, t := range a.seen {
			if now.Sub(t) > a.ttl {
				delete(a.seen, k)
			}
		}
		if len(a.seen) >= maxAccessEntries {
			a.seen = map[string]time.Time{}
		}
	}
	a.seen[key] = a.now()
}

// allowed reports an allowance younger than the TTL.
func (a *accessCache) allowed(key string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.seen[key]
	return ok && a.now().Sub(t) <= a.ttl
}

// allowedStale reports any allowance: used only while upstream is down,
// when it cannot be asked.
func (a *accessCache) allowedStale(key string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.seen[key]
	return ok
}
