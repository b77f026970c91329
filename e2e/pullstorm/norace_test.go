//go:build !race

package main

// raceEnabled: the test builds starling with -race too, like e2e/harness.
const raceEnabled = false
