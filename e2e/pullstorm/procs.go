package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
)

const (
	// stopTimeout is how long a child gets to exit after SIGTERM.
	stopTimeout = 5 * time.Second
	// startTimeout bounds the wait for a child's address file.
	startTimeout = 60 * time.Second
	// logTailLines is how much of a failing process's log is shown.
	logTailLines = 40
)

// child is a process we started: own process group, stdout and stderr in
// one log file, killed with its group when stopped.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once reaped
	err     error         // from Wait; read after done
}

// startChild runs bin with args, logging to logPath.
func startChild(name, logPath, bin string, args ...string) (*child, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own group: a terminal's Ctrl-C reaches only us, and stop reaches
		// the whole group.
		Setpgid: true,
		// If this program dies without cleaning up (SIGKILL), the kernel
		// kills the child.
		Pdeathsig: syscall.SIGKILL,
	}
	startErr := cmd.Start()
	closeErr := logFile.Close() // the child has its own descriptor
	if startErr != nil {
		return nil, fmt.Errorf("start %s: %w", name, startErr)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	if closeErr != nil {
		c.stop()
		return nil, fmt.Errorf("close log of %s: %w", name, closeErr)
	}
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the group, SIGKILL after stopTimeout, and returns
// once the process has been reaped. Idempotent.
func (c *child) stop() {
	pgid := c.pid()
	if !c.exited() {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(stopTimeout):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-c.done
		}
	}
	// Members of the group that outlived the leader; ESRCH if none. The
	// group ID cannot be reused while any member lives.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

// tail returns the last lines of the log.
func (c *child) tail(n int) string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", c.logPath, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// failure wraps err with the child's name, exit status and log tail.
func (c *child) failure(err error) error {
	return fmt.Errorf("%s: %w%s", c.name, err, c.logTail())
}

// logTail is the child's exit status, if it has exited, and the last
// lines of its log, for error messages.
func (c *child) logTail() string {
	status := "running"
	if c.exited() {
		status = fmt.Sprintf("exited: %v", c.err)
		if c.err == nil {
			status = "exited: status 0"
		}
	}
	return fmt.Sprintf("\n--- %s (pid %d, %s): last %d lines of %s ---\n%s\n---",
		c.name, c.pid(), status, logTailLines, c.logPath, c.tail(logTailLines))
}

// peakRSS reads VmHWM (peak resident set size) from /proc.
func (c *child) peakRSS() (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", c.pid()))
	if err != nil {
		return 0, fmt.Errorf("peak RSS of %s: %w", c.name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("peak RSS of %s: parse %q: %w", c.name, v, err)
			}
			return kb << 10, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("peak RSS of %s: %w", c.name, err)
	}
	return 0, fmt.Errorf("peak RSS of %s: no VmHWM in /proc/%d/status", c.name, c.pid())
}

// userHZ is the unit of the CPU times in /proc/PID/stat: USER_HZ, fixed
// at 100 for what the kernel exports to user space.
const userHZ = 100

// cpuTime reads the user plus system CPU time the child has used so far.
func (c *child) cpuTime() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.pid()))
	if err != nil {
		return 0, fmt.Errorf("CPU time of %s: %w", c.name, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces;
	// fields 14 and 15 (utime, stime) follow the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("CPU time of %s: malformed /proc/%d/stat", c.name, c.pid())
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("CPU time of %s: short /proc/%d/stat", c.name, c.pid())
	}
	var ticks int64
	for _, f := range fields[11:13] { // utime, stime: fields 14, 15 overall
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("CPU time of %s: parse %q: %w", c.name, f, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// agentsCPU is the CPU time all agents have used so far.
func (s *swarm) agentsCPU() (time.Duration, error) {
	var sum time.Duration
	for _, a := range s.agents {
		cpu, err := a.cpuTime()
		if err != nil {
			return 0, a.failure(err)
		}
		sum += cpu
	}
	return sum, nil
}

// addrFile is what starling writes to --addr-file once listening.
type addrFile struct {
	Mirror string   `json:"mirror,omitempty"`
	P2P    []string `json:"p2p,omitempty"`
}

// waitAddrFile polls path until the child has written it.
func (c *child) waitAddrFile(ctx context.Context, path string) (addrFile, error) {
	var a addrFile
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		b, err := os.ReadFile(path)
		switch {
		case err == nil && len(b) > 0:
			if err := json.Unmarshal(b, &a); err != nil {
				return a, c.failure(fmt.Errorf("parse address file %s: %w", path, err))
			}
			return a, nil
		case err != nil && !errors.Is(err, os.ErrNotExist):
			return a, fmt.Errorf("read address file of %s: %w", c.name, err)
		}
		select {
		case <-c.done:
			return a, c.failure(fmt.Errorf("exited before it was ready: %v", c.err))
		case <-ctx.Done():
			return a, fmt.Errorf("waiting for %s: %w", c.name, ctx.Err())
		case <-deadline.C:
			return a, c.failure(fmt.Errorf("no address file after %v", startTimeout))
		case <-tick.C:
		}
	}
}

// procSet is every child of one run, for clean-up and the PID list.
type procSet struct {
	mu    sync.Mutex
	procs []*child
}

func (s *procSet) add(c *child) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.procs = append(s.procs, c)
}

func (s *procSet) all() []*child {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*child(nil), s.procs...)
}

// stopAll stops every child concurrently and reports the ones whose log
// shows a data race (starling built with -race).
func (s *procSet) stopAll() error {
	procs := s.all()
	var wg sync.WaitGroup
	for _, c := range procs {
		wg.Go(c.stop)
	}
	wg.Wait()
	var errs []error
	for _, c := range procs {
		b, err := os.ReadFile(c.logPath)
		if err != nil {
			errs = append(errs, fmt.Errorf("read log of %s: %w", c.name, err))
			continue
		}
		if bytes.Contains(b, []byte("WARNING: DATA RACE")) {
			errs = append(errs, c.failure(errors.New("data race reported")))
		}
	}
	return errors.Join(errs...)
}

// buildStarling builds ./cmd/starling from the module root into dir.
func buildStarling(ctx context.Context, moduleRoot, dir string, race bool) (string, error) {
	bin := filepath.Join(dir, "starling")
	args := []string{"build", "-o", bin}
	if race {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/starling")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleRoot
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go %s in %s: %w\n%s", strings.Join(args, " "), moduleRoot, err, out)
	}
	return bin, nil
}

// findModuleRoot walks up from the working directory to go.mod.
func findModuleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("find module root: no go.mod above %s", wd)
		}
	}
}

// makeSwarmKey runs `starling swarm-key` into path.
func makeSwarmKey(ctx context.Context, bin, path string) error {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "swarm-key")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("starling swarm-key: %w: %s", err, stderr.String())
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		return fmt.Errorf("write swarm key: %w", err)
	}
	return nil
}

// swarm is a running supernode and its agents.
type swarm struct {
	supernode *child
	agents    []*child
	mirrors   []string // agent i's mirror URL, http://127.0.0.1:N
}

// swarmSpec is how to start a swarm.
type swarmSpec struct {
	bin, dir, swarmKey, registryURL string
	nodes                           int
	pieceSize                       int64
	agentBW, seedBW                 int64
	logLevel                        string
}

// startSwarm starts the supernode, then all agents at once, and waits until
// every one has written its address file. Every child is added to procs
// as soon as it runs, so the caller's clean-up reaches it on any error.
func startSwarm(ctx context.Context, spec swarmSpec, procs *procSet) (*swarm, error) {
	bytesArg := func(n int64) string { return strconv.FormatInt(n, 10) }
	sdir := filepath.Join(spec.dir, "supernode")
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return nil, fmt.Errorf("supernode dir: %w", err)
	}
	saddr := filepath.Join(sdir, "addrs.json")
	sn, err := startChild("supernode", filepath.Join(sdir, "log"), spec.bin, "supernode",
		"--p2p-listen", "/ip4/127.0.0.1/tcp/0",
		"--metrics-listen", "127.0.0.1:0",
		"--swarm-key", spec.swarmKey,
		"--data-dir", filepath.Join(sdir, "data"),
		"--registry", spec.registryURL,
		"--upload-rate", bytesArg(spec.seedBW),
		"--piece-size", bytesArg(spec.pieceSize),
		"--addr-file", saddr,
		"--log-level", spec.logLevel)
	if err != nil {
		return nil, err
	}
	procs.add(sn)
	sa, err := sn.waitAddrFile(ctx, saddr)
	if err != nil {
		return nil, err
	}
	if len(sa.P2P) == 0 {
		return nil, sn.failure(errors.New("address file lists no p2p address"))
	}
	sw := &swarm{supernode: sn, agents: make([]*child, spec.nodes), mirrors: make([]string, spec.nodes)}
	addrPaths := make([]string, spec.nodes)
	for i := range spec.nodes {
		adir := filepath.Join(spec.dir, fmt.Sprintf("agent-%02d", i))
		if err := os.MkdirAll(adir, 0o700); err != nil {
			return nil, fmt.Errorf("agent dir: %w", err)
		}
		addrPaths[i] = filepath.Join(adir, "addrs.json")
		a, err := startChild(fmt.Sprintf("agent-%02d", i), filepath.Join(adir, "log"), spec.bin, "agent",
			"--listen", "127.0.0.1:0",
			"--metrics-listen", "127.0.0.1:0",
			"--data-dir", filepath.Join(adir, "data"),
			"--registry", spec.registryURL,
			"--supernode", sa.P2P[0],
			"--p2p-listen", "/ip4/127.0.0.1/tcp/0",
			"--swarm-key", spec.swarmKey,
			"--upload-rate", bytesArg(spec.agentBW),
			"--download-rate", bytesArg(spec.agentBW),
			"--piece-size", bytesArg(spec.pieceSize),
			"--addr-file", addrPaths[i],
			"--log-level", spec.logLevel)
		if err != nil {
			return nil, err
		}
		procs.add(a)
		sw.agents[i] = a
	}
	g, gctx := errgroup.WithContext(ctx)
	for i, a := range sw.agents {
		g.Go(func() error {
			af, err := a.waitAddrFile(gctx, addrPaths[i])
			if err != nil {
				return err
			}
			if af.Mirror == "" {
				return a.failure(errors.New("address file lists no mirror address"))
			}
			sw.mirrors[i] = "http://" + af.Mirror
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return sw, nil
}
