// Command starling is the single binary of Starling: the per-node agent,
// the supernode, and small tools around them.
package main

import (
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/logging"
	"github.com/starling-oci/starling/pkg/nodeconfig"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/version"
	"github.com/starling-oci/starling/supernode"
	"github.com/starling-oci/starling/supernode/preheat"
)

const usage = `starling: P2P container image distribution

Usage:
  starling agent [flags]       run the node agent (registry mirror + swarm peer)
  starling supernode [flags]   run a supernode (tracker + seed)
  starling configure [flags]   point the node's container runtime at its agent
  starling preheat [flags] IMAGE  have the supernodes seed an image's blobs before a rollout
  starling swarm-key FILE      write a new pre-shared swarm key to FILE (mode 0600)
  starling id FILE             print the peer ID of an identity file, creating it if absent
  starling version             print the version, commit and Go version
  starling help                show this text

Run "starling COMMAND -h" for a command's flags.
`

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go onSignals(sigs, cancel, func() {
		fmt.Fprintln(os.Stderr, "starling: second signal: exiting at once")
		os.Exit(1)
	})
	err := run(ctx, os.Args[1:], os.Stdout)
	signal.Stop(sigs)
	cancel()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "starling:", err)
		os.Exit(1)
	}
}

// onSignals cancels the run at the first signal, so that it shuts down
// in order, and calls exitNow at the second: an operator who presses
// Ctrl-C twice wants the process gone.
func onSignals(sigs <-chan os.Signal, cancel func(), exitNow func()) {
	if _, ok := <-sigs; !ok {
		return
	}
	cancel()
	if _, ok := <-sigs; ok {
		exitNow()
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New(`no command given; run "starling help" for the commands`)
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "agent":
		return runAgent(ctx, rest, stdout)
	case "supernode":
		return runSupernode(ctx, rest, stdout)
	case "configure":
		return runConfigure(rest, stdout)
	case "preheat":
		return runPreheat(ctx, rest, stdout)
	case "swarm-key":
		switch len(rest) {
		case 0:
			return swarmKeyToStdout(stdout)
		case 1:
			return p2p.WriteSwarmKeyFile(rest[0])
		}
		return errors.New("usage: starling swarm-key FILE")
	case "id":
		if len(rest) != 1 {
			return errors.New("usage: starling id FILE")
		}
		id, err := p2p.PeerIDFromIdentity(rest[0])
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, id)
		return nil
	case "version", "--version":
		fmt.Fprintln(stdout, version.Get())
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf(`unknown command %q; run "starling help" for the commands`, cmd)
}

// swarmKeyToStdout prints a new swarm key. When stdout is a file (the
// shell's `> swarm.key`, created 0644 under the usual umask), the file is
// made private first: the key lets anyone who reads it join the swarm.
func swarmKeyToStdout(stdout io.Writer) error {
	if f, ok := stdout.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
			if err := f.Chmod(0o600); err != nil {
				return fmt.Errorf("make %s private before writing the swarm key: %w", f.Name(), err)
			}
		}
	}
	return p2p.GenerateSwarmKey(stdout)
}

func runAgent(ctx context.Context, args []string, stdout io.Writer) error {
	cfg := agent.DefaultConfig()
	return runDaemon(ctx, "starling agent", args, stdout, &cfg, cfg.BindFlags, func() string { return cfg.LogLevel },
		func(log *zap.Logger) error { return agent.Run(ctx, cfg, log) })
}

func runSupernode(ctx context.Context, args []string, stdout io.Writer) error {
	cfg := supernode.DefaultConfig()
	return runDaemon(ctx, "starling supernode", args, stdout, &cfg, cfg.BindFlags, func() string { return cfg.LogLevel },
		func(log *zap.Logger) error { return supernode.Run(ctx, cfg, log) })
}

// runConfigure writes (or removes) the runtime configuration and prints
// what it did.
func runConfigure(args []string, stdout io.Writer) error {
	cfg := nodeconfig.DefaultConfig()
	if err := loadFlags("starling configure", args, stdout, &cfg, cfg.BindFlags); err != nil {
		return err
	}
	report, err := nodeconfig.Apply(cfg)
	for _, line := range report {
		fmt.Fprintln(stdout, line)
	}
	return err
}

// runPreheat asks a supernode to preheat one image.
func runPreheat(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("starling preheat", flag.ContinueOnError)
	fs.SetOutput(stdout)
	url := fs.String("supernode-url", "http://127.0.0.1:4080", "a supernode's HTTP API (its --http-listen)")
	tokenFile := fs.String("token-file", "", "file with the bearer token of the preheat API")
	basicFile := fs.String("basic-auth-file", "", "file with user:password for the preheat API")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: starling preheat [--supernode-url URL] [--token-file F | --basic-auth-file F] IMAGE")
	}
	var authz string
	switch {
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return err
		}
		authz = "Bearer " + strings.TrimSpace(string(b))
	case *basicFile != "":
		b, err := os.ReadFile(*basicFile)
		if err != nil {
			return err
		}
		authz = "Basic " + base64.StdEncoding.EncodeToString([]byte(strings.TrimSpace(string(b))))
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := preheat.Notify(ctx, http.DefaultClient, *url, fs.Arg(0), authz); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "preheat of %s accepted by %s: its blobs are being seeded\n", fs.Arg(0), *url)
	return nil
}

// runDaemon loads a long-running command's settings (defaults, YAML,
// flags), builds its logger at the configured level and runs it.
func runDaemon(ctx context.Context, name string, args []string, stdout io.Writer, cfg any, bind func(*flag.FlagSet),
	level func() string, run func(*zap.Logger) error) error {
	if err := loadFlags(name, args, stdout, cfg, bind); err != nil {
		return err
	}
	log, err := logging.New(level())
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	v := version.Get()
	log.Info("starting "+name, zap.String("version", v.Version), zap.String("commit", v.Commit), zap.String("go", v.GoVersion))
	return run(log)
}

// loadFlags loads a command's settings. -h prints the flags to stdout; any
// other mistake is one short error (the flag package's page of usage is
// not printed), which main prints last.
func loadFlags(name string, args []string, stdout io.Writer, cfg any, bind func(*flag.FlagSet)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := config.LoadEnv(fs, args, os.LookupEnv, cfg, bind)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: %s [flags]\n\nEvery flag is also a key of the --config YAML file and a %s variable.\n\nFlags:\n", name, config.EnvName("<FLAG>"))
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		return fmt.Errorf("%s: %w; run \"%s -h\" for its flags", name, err, name)
	}
	return nil
}
