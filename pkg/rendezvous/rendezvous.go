// Package rendezvous picks the owner of a key among a set of nodes by
// highest random weight: every agent computes the same owner without
// coordination, and removing a node moves only the keys it owned.
package rendezvous

import (
	"crypto/sha256"
	"encoding/binary"
	"sort"
)

// Rank returns nodes ordered by preference for key: the owner first, then
// the node that takes over if the owner fails, and so on.
func Rank(key string, nodes []string) []string {
	type scored struct {
		node  string
		score uint64
	}
	s := make([]scored, len(nodes))
	for i, n := range nodes {
		h := sha256.New()
		h.Write([]byte(n))
		h.Write([]byte{0})
		h.Write([]byte(key))
		s[i] = scored{n, binary.BigEndian.Uint64(h.Sum(nil))}
	}
	sort.Slice(s, func(i, j int) bool {
		if s[i].score != s[j].score {
			return s[i].score > s[j].score
		}
		return s[i].node < s[j].node
	})
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.node
	}
	return out
}
