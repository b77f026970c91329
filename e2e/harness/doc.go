// Package harness runs real processes for Starling's end-to-end tests: a
// distribution registry, a private containerd, skopeo, and the starling
// binary itself (agent and supernode).
//
// Every helper takes a testing.TB, registers t.Cleanup to stop what it
// started and to remove what it created, and binds to 127.0.0.1 only.
// Servers bind port 0 and the harness discovers the real port from the
// server itself (a log line or an address file); there is no "find a free
// port" helper because such helpers race with other processes.
//
// Synchronisation is always a polled condition with a deadline (a log line, a
// file appearing, a command succeeding), never a bare sleep.
//
// Tools that may be missing on a developer machine are guarded by
// RequireTool: the test is skipped locally and fails under CI=true, naming the
// Debian package to install.
package harness
