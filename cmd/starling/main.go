// Command starling is the single binary of Starling: the per-node agent,
// the supernode, and small tools around them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/logging"
	"github.com/starling-oci/starling/pkg/nodeconfig"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/pkg/version"
	"github.com/starling-oci/starling/supernode"
)

const usage = `starling: P2P container image distribution

Usage:
  starling agent [flags]       run the node agent (registry mirror + swarm peer)
  starling supernode [flags]   run a supernode (tracker + seed)
  starling configure [flags]   point the node's container runtime at its agent
  starling swarm-key           print a new pre-shared swarm key
  starling id FILE             print the peer ID of an identity file, creating it if absent
  starling version             print the version, commit and Go version
  starling help                show this text

Run "starling COMMAND -h" for a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "starling:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "agent":
		return runAgent(ctx, rest, stderr)
	case "supernode":
		return runSupernode(ctx, rest, stderr)
	case "configure":
		return runConfigure(rest, stdout, stderr)
	case "swarm-key":
		if len(rest) != 0 {
			return errors.New("usage: starling swarm-key > swarm.key")
		}
		return p2p.GenerateSwarmKey(stdout)
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
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

func runAgent(ctx context.Context, args []string, stderr io.Writer) error {
	cfg := agent.DefaultConfig()
	return runDaemon(ctx, "starling agent", args, stderr, &cfg, cfg.BindFlags, func() string { return cfg.LogLevel },
		func(log *zap.Logger) error { return agent.Run(ctx, cfg, log) })
}

func runSupernode(ctx context.Context, args []string, stderr io.Writer) error {
	cfg := supernode.DefaultConfig()
	return runDaemon(ctx, "starling supernode", args, stderr, &cfg, cfg.BindFlags, func() string { return cfg.LogLevel },
		func(log *zap.Logger) error { return supernode.Run(ctx, cfg, log) })
}

// runConfigure writes (or removes) the runtime configuration and prints
// what it did.
func runConfigure(args []string, stdout, stderr io.Writer) error {
	cfg := nodeconfig.DefaultConfig()
	fs := flag.NewFlagSet("starling configure", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := config.LoadEnv(fs, args, os.LookupEnv, &cfg, cfg.BindFlags); err != nil {
		return err
	}
	report, err := nodeconfig.Apply(cfg)
	for _, line := range report {
		fmt.Fprintln(stdout, line)
	}
	return err
}

// runDaemon loads a long-running command's settings (defaults, YAML,
// flags), builds its logger at the configured level and runs it.
func runDaemon(ctx context.Context, name string, args []string, stderr io.Writer, cfg any, bind func(*flag.FlagSet),
	level func() string, run func(*zap.Logger) error) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := config.LoadEnv(fs, args, os.LookupEnv, cfg, bind); err != nil {
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
