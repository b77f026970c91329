package harness

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// StopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
const StopTimeout = 10 * time.Second

// logTailLines is how many log lines a failed test gets to see per process.
const logTailLines = 50

// Process is a child process started by the harness. Its stdout and stderr
// go to one log file. It runs in its own process group, and the whole group
// is killed when the test ends.
type Process struct {
	name    string
	cmd     *exec.Cmd
	logPath string

	done chan struct{} // closed once the process has been reaped
	err  error         // result of cmd.Wait; read only after done is closed

	mu        sync.Mutex
	signalled bool // Stop or Kill was called: the exit is expected
}

// StartProcess starts bin with args, stdout and stderr appended to a log
// file in a temporary directory. When the test ends the process group is
// stopped (SIGTERM, then SIGKILL after StopTimeout) and, if the test failed,
// the last lines of the log are written to the test log.
func StartProcess(t testing.TB, name, bin string, args ...string) *Process {
	t.Helper()
	return StartCommand(t, name, exec.Command(bin, args...))
}

// StartCommand is StartProcess for a prepared, not yet started *exec.Cmd, for
// callers that need to set Env or Dir. cmd.Stdout and cmd.Stderr must be nil:
// the harness points both at the process log.
func StartCommand(t testing.TB, name string, cmd *exec.Cmd) *Process {
	t.Helper()
	if cmd.Stdout != nil || cmd.Stderr != nil {
		t.Fatalf("StartCommand(%s): Stdout and Stderr must be nil, the harness logs them", name)
	}
	logFile, err := os.CreateTemp(t.TempDir(), sanitize(name)+"-*.log")
	if err != nil {
		t.Fatalf("create log file for %s: %v", name, err)
	}
	// Both streams share one *os.File, hence one file offset: each line a
	// process writes with a single write(2) lands whole, in order.
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Own process group so that cleanup reaches grandchildren too.
	cmd.SysProcAttr.Setpgid = true
	// If the test binary dies (go test -timeout panics, or it is killed),
	// the kernel kills the child, so no registry or containerd outlives it.
	// (Strictly, the signal fires when the OS thread that forked exits; the
	// Go runtime only retires threads of goroutines that exit while locked
	// with LockOSThread, which the harness never does.)
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL

	p := &Process{
		name:    name,
		cmd:     cmd,
		logPath: logFile.Name(),
		done:    make(chan struct{}),
	}
	startErr := cmd.Start()
	// The child holds its own descriptor; ours is no longer needed.
	if err := logFile.Close(); err != nil {
		t.Errorf("close log file of %s: %v", name, err)
	}
	if startErr != nil {
		t.Fatalf("start %s (%s): %v", name, cmd.Path, startErr)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Logf("started %s (pid %d): %s; log %s", name, cmd.Process.Pid, strings.Join(cmd.Args, " "), p.logPath)

	t.Cleanup(func() {
		unexpected := false
		select {
		case <-p.done:
			p.mu.Lock()
			unexpected = !p.signalled
			p.mu.Unlock()
		default:
		}
		p.Stop()
		if unexpected {
			t.Logf("%s exited before the test ended, by itself: %v", name, p.err)
		}
		log, err := os.ReadFile(p.logPath)
		if err != nil {
			t.Errorf("read log of %s: %v", name, err)
			return
		}
		if bytes.Contains(log, []byte("WARNING: DATA RACE")) {
			t.Errorf("%s reported a data race; see its log %s", name, p.logPath)
		}
		if t.Failed() {
			t.Logf("last %d lines of %s log (%s):\n%s", logTailLines, name, p.logPath, tail(log, logTailLines))
		}
	})
	return p
}

// Name returns the name given at start.
func (p *Process) Name() string { return p.name }

// Pid returns the process ID.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath returns the path of the file holding stdout and stderr.
func (p *Process) LogPath() string { return p.logPath }

// Log returns the log written so far.
func (p *Process) Log() ([]byte, error) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("read log of %s: %w", p.name, err)
	}
	return b, nil
}

// Exited is closed once the process has exited and been reaped.
func (p *Process) Exited() <-chan struct{} { return p.done }

// Err returns the result of waiting for the process (nil for exit status 0,
// an *exec.ExitError otherwise). Valid only after Exited is closed.
func (p *Process) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return errors.New(p.name + " is still running")
	}
}

// Signal sends sig to the whole process group. It is a no-op once the process
// has exited.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("send %v to %s (pgid %d): %w", sig, p.name, p.cmd.Process.Pid, err)
	}
	return nil
}

// Stop sends SIGTERM to the process group, waits up to StopTimeout for the
// process to exit, then sends SIGKILL and waits. It is idempotent and returns
// once the process has been reaped.
func (p *Process) Stop() {
	p.markSignalled()
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(StopTimeout):
		p.Kill()
	}
	// Reap stragglers that ignored SIGTERM while the leader exited.
	p.killGroupRemnants()
}

// Kill sends SIGKILL to the process group and waits until the process has
// been reaped. It is idempotent.
func (p *Process) Kill() {
	p.markSignalled()
	_ = p.Signal(syscall.SIGKILL)
	<-p.done
	p.killGroupRemnants()
}

// Wait waits up to timeout for the process to exit by itself and returns its
// exit error.
func (p *Process) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %v", p.name, timeout)
	}
}

func (p *Process) markSignalled() {
	p.mu.Lock()
	p.signalled = true
	p.mu.Unlock()
}

// killGroupRemnants kills members of the process group that outlived the
// leader. While any member lives, the kernel does not reuse the group ID, so
// this cannot hit an unrelated process; if none lives it fails with ESRCH.
func (p *Process) killGroupRemnants() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
}

// WaitForLog polls the process log until a line matches re and returns the
// submatches of the first matching line. It fails the test if the process
// exits first or the timeout expires.
func (p *Process) WaitForLog(t testing.TB, re *regexp.Regexp, timeout time.Duration) []string {
	t.Helper()
	var match []string
	err := poll(timeout, func() (bool, error) {
		exited := false
		select {
		case <-p.done:
			exited = true
		default:
		}
		// Read after checking for exit so that a line written just before
		// exiting is still seen.
		log, err := p.Log()
		if err != nil {
			return false, err
		}
		for _, line := range strings.Split(string(log), "\n") {
			if m := re.FindStringSubmatch(line); m != nil {
				match = m
				return true, nil
			}
		}
		if exited {
			return false, fmt.Errorf("%s exited (%v)", p.name, p.err)
		}
		return false, nil
	})
	if err != nil {
		log, _ := p.Log()
		t.Fatalf("waiting for %s to log %q: %v\nlast lines of its log:\n%s", p.name, re, err, tail(log, logTailLines))
	}
	return match
}

// WaitForFile polls until path exists and is non-empty, and returns its
// contents. It fails the test after timeout. Writers should create the file
// atomically (write a temporary file, then rename) so that a non-empty file
// is a complete one.
func WaitForFile(t testing.TB, path string, timeout time.Duration) []byte {
	t.Helper()
	b, err := waitForFile(path, timeout, nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitForFile is WaitForFile that also gives up as soon as proc (if not nil)
// exits.
func waitForFile(path string, timeout time.Duration, proc *Process) ([]byte, error) {
	var data []byte
	err := poll(timeout, func() (bool, error) {
		exited := false
		if proc != nil {
			select {
			case <-proc.done:
				exited = true
			default:
			}
		}
		b, err := os.ReadFile(path)
		switch {
		case err == nil && len(b) > 0:
			data = b
			return true, nil
		case err != nil && !errors.Is(err, os.ErrNotExist):
			return false, fmt.Errorf("read %s: %w", path, err)
		case exited:
			return false, fmt.Errorf("%s exited (%v) before writing %s", proc.name, proc.err, path)
		}
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("wait for file %s: %w", path, err)
	}
	return data, nil
}

// poll calls cond until it returns true or an error, or until timeout. The
// interval grows from 5ms to 100ms: quick for fast conditions, light on the
// CPU for slow ones.
func poll(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	interval := 5 * time.Millisecond
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("condition not met after %v", timeout)
		}
		time.Sleep(interval) // pacing between checks of a condition with a deadline
		interval = min(2*interval, 100*time.Millisecond)
	}
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// sanitize makes s usable as part of a file name.
func sanitize(s string) string {
	s = unsafeChars.ReplaceAllString(s, "_")
	if s == "" {
		return "proc"
	}
	return filepath.Base(s)
}
