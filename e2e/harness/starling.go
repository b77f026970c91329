package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// AddrFile is the JSON document a starling process writes, atomically, to
// the path given by --addr-file once it is listening, e.g.
//
//	{"mirror":"127.0.0.1:41234","p2p":["/ip4/127.0.0.1/tcp/40000/p2p/12D3..."]}
type AddrFile struct {
	// Mirror is the host:port of the agent's registry mirror (agents only).
	Mirror string `json:"mirror,omitempty"`
	// P2P are the libp2p multiaddrs, each ending in /p2p/<peer ID>.
	P2P []string `json:"p2p,omitempty"`
	// Raw holds every field of the file, including ones this struct does
	// not know yet (e.g. a supernode's status API address).
	Raw map[string]json.RawMessage `json:"-"`
}

// ParseAddrFile decodes an address file.
func ParseAddrFile(b []byte) (AddrFile, error) {
	var a AddrFile
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("parse address file: %w", err)
	}
	if err := json.Unmarshal(b, &a.Raw); err != nil {
		return a, fmt.Errorf("parse address file: %w", err)
	}
	if a.Mirror != "" {
		if _, _, err := net.SplitHostPort(a.Mirror); err != nil {
			return a, fmt.Errorf("parse address file: mirror %q: %w", a.Mirror, err)
		}
	}
	return a, nil
}

// Node is a running starling process (agent or supernode) started with
// --addr-file and --data-dir (and, for agents, --listen).
type Node struct {
	role     string
	name     string
	bin      string
	args     []string // everything after the binary, role subcommand first
	dataDir  string
	addrFile string

	mu    sync.Mutex
	proc  *Process
	addrs AddrFile
}

// Agent is a running `starling agent`.
type Agent struct{ *Node }

// Supernode is a running `starling supernode`.
type Supernode struct{ *Node }

// StartAgent runs `BIN agent [defaults] ARGS...` and waits for its address
// file. Defaults are added for the flags ARGS does not set:
// --addr-file (in a temp dir), --data-dir (a temp dir) and
// --listen 127.0.0.1:0. It fails the test if the agent exits before writing
// the file, or writes no mirror address.
func StartAgent(t testing.TB, bin string, args ...string) *Agent {
	t.Helper()
	n := startNode(t, "agent", bin, args)
	if n.addrs.Mirror == "" {
		t.Fatalf("%s wrote no mirror address to %s: %s", n.name, n.addrFile, rawString(n.addrs))
	}
	return &Agent{n}
}

// StartSupernode runs `BIN supernode [defaults] ARGS...` like StartAgent,
// except that it adds no --listen (a supernode has no HTTP listener and
// rejects the flag; pass --p2p-listen), and fails the test if the address
// file lists no p2p address.
func StartSupernode(t testing.TB, bin string, args ...string) *Supernode {
	t.Helper()
	n := startNode(t, "supernode", bin, args)
	if len(n.addrs.P2P) == 0 {
		t.Fatalf("%s wrote no p2p address to %s: %s", n.name, n.addrFile, rawString(n.addrs))
	}
	return &Supernode{n}
}

func startNode(t testing.TB, role, bin string, userArgs []string) *Node {
	t.Helper()
	n := &Node{role: role, bin: bin}
	var defaults []string
	if v, ok := flagValue(userArgs, "addr-file"); ok {
		n.addrFile = v
	} else {
		n.addrFile = filepath.Join(t.TempDir(), "addrs.json")
		defaults = append(defaults, "--addr-file", n.addrFile)
	}
	if v, ok := flagValue(userArgs, "data-dir"); ok {
		n.dataDir = v
	} else {
		n.dataDir = t.TempDir()
		defaults = append(defaults, "--data-dir", n.dataDir)
	}
	// Only the agent has an HTTP listener: `starling supernode` fails on an
	// unknown --listen flag.
	if _, ok := flagValue(userArgs, "listen"); !ok && role == "agent" {
		defaults = append(defaults, "--listen", "127.0.0.1:0")
	}
	// Both roles serve metrics on a fixed port by default, which several
	// processes on one machine cannot share.
	if _, ok := flagValue(userArgs, "metrics-listen"); !ok {
		defaults = append(defaults, "--metrics-listen", "127.0.0.1:0")
	}
	n.args = slices.Concat([]string{role}, defaults, userArgs)
	// t.TempDir names its directories 001, 002, ...: distinct names for
	// the several agents of one test.
	n.name = role + "-" + filepath.Base(n.dataDir)
	if err := n.start(t); err != nil {
		t.Fatal(err)
	}
	return n
}

// start launches the process and waits for a fresh address file.
func (n *Node) start(t testing.TB) error {
	t.Helper()
	// A stale file from a previous run would be mistaken for this one's.
	if err := os.Remove(n.addrFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove old address file of %s: %w", n.name, err)
	}
	cmd := exec.Command(n.bin, n.args...)
	cmd.Env = withGORACE(os.Environ(), "atexit_sleep_ms=0")
	proc := StartCommand(t, n.name, cmd)
	b, err := waitForFile(n.addrFile, StartTimeout, proc)
	if err != nil {
		log, _ := proc.Log()
		return fmt.Errorf("start %s: %w\nlast lines of its log:\n%s", n.name, err, tail(log, logTailLines))
	}
	addrs, err := ParseAddrFile(b)
	if err != nil {
		return fmt.Errorf("start %s: %w", n.name, err)
	}
	n.mu.Lock()
	n.proc, n.addrs = proc, addrs
	n.mu.Unlock()
	t.Logf("%s up: %s", n.name, b)
	return nil
}

// Name returns the name used in logs, e.g. "agent-001".
func (n *Node) Name() string { return n.name }

// Addrs returns the parsed address file of the current run.
func (n *Node) Addrs() AddrFile {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.addrs
}

// MirrorAddr returns the host:port of the registry mirror.
func (n *Node) MirrorAddr() string { return n.Addrs().Mirror }

// MetricsURL returns the http:// URL of the metrics and health listener.
func (n *Node) MetricsURL() string {
	var a string
	if raw, ok := n.Addrs().Raw["metrics"]; ok {
		_ = json.Unmarshal(raw, &a)
	}
	return "http://" + a
}

// HTTPURL returns the http:// URL of a supernode's status and preheat API
// (--http-listen).
func (n *Node) HTTPURL() string {
	var a string
	if raw, ok := n.Addrs().Raw["http"]; ok {
		_ = json.Unmarshal(raw, &a)
	}
	return "http://" + a
}

// MirrorURL returns http://MirrorAddr().
func (n *Node) MirrorURL() string { return "http://" + n.MirrorAddr() }

// P2PAddrs returns the libp2p multiaddrs, each with its /p2p/<peer ID>.
func (n *Node) P2PAddrs() []string { return slices.Clone(n.Addrs().P2P) }

// DataDir returns the --data-dir; it survives Stop, Kill and Restart.
func (n *Node) DataDir() string { return n.dataDir }

// AddrFilePath returns the --addr-file path.
func (n *Node) AddrFilePath() string { return n.addrFile }

// Args returns the arguments after the binary, role subcommand first.
func (n *Node) Args() []string { return slices.Clone(n.args) }

// Process returns the process of the current run.
func (n *Node) Process() *Process {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc
}

// Stop stops the process gracefully (SIGTERM, SIGKILL after StopTimeout)
// and waits for it. Idempotent.
func (n *Node) Stop() { n.Process().Stop() }

// Kill sends SIGKILL and waits: a crash, for crash-recovery tests.
// Idempotent.
func (n *Node) Kill() { n.Process().Kill() }

// Restart kills the current process if it still runs, starts a new one with
// the same arguments and data dir, and waits for its new address file.
// Addresses may change (ports are chosen again); read them afterwards.
func (n *Node) Restart(t testing.TB) {
	t.Helper()
	n.Kill()
	if err := n.start(t); err != nil {
		t.Fatal(err)
	}
}

// flagValue finds --name or -name in args, as "--name value" or
// "--name=value", and returns its last value.
func flagValue(args []string, name string) (string, bool) {
	var val string
	found := false
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		trimmed := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if trimmed == a {
			continue // not a flag
		}
		if k, v, ok := strings.Cut(trimmed, "="); ok {
			if k == name {
				val, found = v, true
			}
			continue
		}
		if trimmed == name && i+1 < len(args) {
			val, found = args[i+1], true
			i++
		}
	}
	return val, found
}

func rawString(a AddrFile) string {
	b, err := json.Marshal(a.Raw)
	if err != nil {
		return fmt.Sprintf("%v", a.Raw)
	}
	return string(b)
}

// withGORACE returns env with opts appended to GORACE. A binary built with
// -race sleeps atexit_sleep_ms (default 1s) before exiting, which every Stop
// and Kill of a race-enabled starling would otherwise pay. Binaries built
// without -race ignore GORACE.
func withGORACE(env []string, opts string) []string {
	out := make([]string, 0, len(env)+1)
	cur := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "GORACE="); ok {
			cur = v
			continue
		}
		out = append(out, kv)
	}
	return append(out, "GORACE="+strings.TrimSpace(cur+" "+opts))
}
