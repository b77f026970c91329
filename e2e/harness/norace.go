//go:build !race

package harness

// raceEnabled reports whether the test binary runs under the race detector;
// BuildStarling then builds starling with -race as well.
const raceEnabled = false
