package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestHelpGoesToStdout: every command's -h prints its usage on stdout (so
// `starling agent -h | less` works); run has no stderr to print it to.
func TestHelpGoesToStdout(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"help"}, {"agent", "-h"}, {"supernode", "--help"}, {"configure", "-h"}} {
		var stdout bytes.Buffer
		err := run(context.Background(), args, &stdout)
		if err != nil && !errors.Is(err, flag.ErrHelp) {
			t.Errorf("%v: %v", args, err)
		}
		if !strings.Contains(stdout.String(), "Usage") {
			t.Errorf("%v: stdout %q; want the usage", args, stdout.String())
		}
	}
}

// TestWrongFlagIsOneShortError: no page of usage, just the error, naming
// the closest flag and how to get help.
func TestWrongFlagIsOneShortError(t *testing.T) {
	var stdout bytes.Buffer
	err := run(context.Background(), []string{"agent", "--registery", "http://127.0.0.1:5000"}, &stdout)
	if err == nil {
		t.Fatal("accepted")
	}
	msg := err.Error()
	for _, want := range []string{"-registery", "did you mean --registry", "starling agent -h"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if stdout.Len() != 0 || strings.Count(msg, "\n") > 0 {
		t.Errorf("a wrong flag printed %d bytes besides a %d-line error; want the one-line error only",
			stdout.Len(), strings.Count(msg, "\n")+1)
	}
	if err := run(context.Background(), []string{"frobnicate"}, &stdout); err == nil || stdout.Len() != 0 || !strings.Contains(err.Error(), "starling help") {
		t.Errorf("unknown command: %v, printed %d bytes; want a short error pointing at help", err, stdout.Len())
	}
}

func TestSwarmKeyToPathIsPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "swarm.key")
	var stdout bytes.Buffer
	if err := run(context.Background(), []string{"swarm-key", path}, &stdout); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("swarm key mode %v, want 0600", fi.Mode().Perm())
	}
}

// TestSwarmKeyRedirectedToAFileIsPrivate: `starling swarm-key > swarm.key`
// leaves the shell's 0644 file at 0600.
func TestSwarmKeyRedirectedToAFileIsPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "swarm.key")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := run(context.Background(), []string{"swarm-key"}, f); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Size() == 0 {
		t.Fatalf("redirected swarm key: mode %v, %d bytes; want 0600 and the key", fi.Mode().Perm(), fi.Size())
	}
}

func TestSecondSignalExitsAtOnce(t *testing.T) {
	sigs := make(chan os.Signal, 2)
	cancelled, exited := make(chan struct{}), make(chan struct{})
	go onSignals(sigs, func() { close(cancelled) }, func() { close(exited) })
	sigs <- syscall.SIGTERM
	<-cancelled
	select {
	case <-exited:
		t.Fatal("exited at the first signal")
	default:
	}
	sigs <- syscall.SIGINT
	<-exited
}
