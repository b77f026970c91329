package rendezvous

import (
	"fmt"
	"slices"
	"testing"
)

func TestRankIsStableAndBalanced(t *testing.T) {
	nodes := []string{"a", "b", "c", "d"}
	owners := map[string]int{}
	for i := range 4000 {
		key := fmt.Sprintf("sha256:%064d", i)
		r := Rank(key, nodes)
		if len(r) != 4 {
			t.Fatalf("rank has %d nodes", len(r))
		}
		// Order of the input does not matter.
		if !slices.Equal(r, Rank(key, []string{"d", "c", "b", "a"})) {
			t.Fatalf("rank depends on input order for %s", key)
		}
		owners[r[0]]++
		// Removing a non-owner never moves the key.
		without := slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == r[3] })
		if Rank(key, without)[0] != r[0] {
			t.Fatalf("removing %s moved %s", r[3], key)
		}
		// Removing the owner hands the key to the runner-up.
		without = slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == r[0] })
		if Rank(key, without)[0] != r[1] {
			t.Fatalf("failover for %s is not the runner-up", key)
		}
	}
	for n, c := range owners {
		if c < 800 || c > 1200 {
			t.Errorf("node %s owns %d of 4000 keys, want about 1000", n, c)
		}
	}
}
