// Command pullstorm benchmarks Starling against the pull storm it exists
// for: N nodes pulling the same image at the same moment.
//
// It builds the starling binary, starts an upstream registry (embedded, or
// a counting proxy in front of -registry) whose egress is counted and
// rate-limited, generates and pushes an image, starts a supernode and N
// agents as separate processes on loopback, and has every node pull the
// image through its own agent at the same instant, verifying every digest.
// Mode direct is the baseline: every node pulls straight from the registry.
// Links are emulated with token buckets so that the Kumar–Ross minimum
// distribution time is meaningful on one machine. See docs/BENCHMARKS.md.
//
//	go run ./e2e/pullstorm -nodes 8 -size 64MiB -mode both -chart pullstorm.svg -json pullstorm.json
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/starling-oci/starling/pkg/config"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := mainErr(ctx, os.Args[1:], os.Stdout)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "pullstorm:", err)
		os.Exit(1)
	}
}

// byteFlag is a flag.Value for a byte count or a rate with units
// (128MiB, 20MiB, 20MiB/s, 1048576).
type byteFlag struct{ n *int64 }

func (f byteFlag) String() string {
	if f.n == nil {
		return "0"
	}
	return fmt.Sprint(*f.n)
}

func (f byteFlag) Set(s string) error {
	v, err := config.ParseBytes(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return err
	}
	*f.n = v
	return nil
}

func mainErr(ctx context.Context, args []string, stdout *os.File) error {
	cfg := Config{
		Nodes: 8, Size: 64 << 20, Layers: 4, PieceSize: 1 << 20,
		AgentBW: 20 << 20, SeedBW: 20 << 20, RegistryBW: 40 << 20,
		Repo: "pullstorm/image", Timeout: 10 * time.Minute,
	}
	fs := flag.NewFlagSet("pullstorm", flag.ContinueOnError)
	fs.IntVar(&cfg.Nodes, "nodes", cfg.Nodes, "pulling nodes (one agent each in p2p mode)")
	fs.Var(byteFlag{&cfg.Size}, "size", "image payload, e.g. 128MiB, split evenly over -layers")
	fs.IntVar(&cfg.Layers, "layers", cfg.Layers, "layers in the image")
	fs.Var(byteFlag{&cfg.PieceSize}, "piece-size", "swarm piece size")
	fs.Var(byteFlag{&cfg.AgentBW}, "agent-bw", "each agent's upload and download cap in bytes/s, e.g. 20MiB (direct: each node's download); 0 = unlimited")
	fs.Var(byteFlag{&cfg.SeedBW}, "seed-bw", "supernode upload cap in bytes/s; 0 = unlimited")
	fs.Var(byteFlag{&cfg.RegistryBW}, "registry-bw", "upstream registry egress cap in bytes/s; 0 = unlimited")
	mode := fs.String("mode", "both", "p2p, direct (every node pulls straight from the registry) or both")
	fs.StringVar(&cfg.Registry, "registry", "", "external registry http(s)://host[:port] to push to and pull from (anonymous pulls) instead of the embedded one")
	fs.StringVar(&cfg.Repo, "repo", cfg.Repo, "repository to push the image to")
	jsonPath := fs.String("json", "", "write the results as JSON to this file")
	chartPath := fs.String("chart", "", "write an SVG of the completion-time CDFs to this file")
	fs.StringVar(&cfg.StarlingBin, "starling-bin", os.Getenv("STARLING_E2E_BIN"), "prebuilt starling binary (default: go build ./cmd/starling; env STARLING_E2E_BIN)")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "bound on each mode's pull phase")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the work dir (agent and supernode logs and data) and print its path")
	fs.StringVar(&cfg.LogLevel, "log-level", "info", "--log-level of the starling processes (debug, info, warn, error)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	switch *mode {
	case "both":
		cfg.Modes = []string{modeP2P, modeDirect}
	case modeP2P, modeDirect:
		cfg.Modes = []string{*mode}
	default:
		return fmt.Errorf("-mode %q: want p2p, direct or both", *mode)
	}
	cfg.Out = stdout
	cfg.Live = isTerminal(stdout)

	fmt.Fprintf(stdout, "pull storm: %d nodes, %s in %d layers, piece %s; agent %s, seed %s, registry %s\n",
		cfg.Nodes, fmtBytes(cfg.Size), cfg.Layers, fmtBytes(cfg.PieceSize),
		fmtRate(cfg.AgentBW), fmtRate(cfg.SeedBW), fmtRate(cfg.RegistryBW))
	start := time.Now()
	res, runErr := run(ctx, cfg)
	if len(res.Runs) > 0 {
		fmt.Fprintln(stdout)
		if err := printTable(stdout, res.Runs); err != nil {
			return errors.Join(runErr, err)
		}
	}
	fmt.Fprintf(stdout, "wall time %v\n", time.Since(start).Round(time.Millisecond))
	var errs []error
	if *jsonPath != "" && len(res.Runs) > 0 {
		errs = append(errs, writeFile(stdout, "results (JSON)", *jsonPath, func(w io.Writer) error {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			if err := enc.Encode(res); err != nil {
				return fmt.Errorf("encode JSON: %w", err)
			}
			return nil
		}))
	}
	if *chartPath != "" && len(res.Runs) > 0 {
		errs = append(errs, writeFile(stdout, "completion-time chart (SVG)", *chartPath, func(w io.Writer) error { return writeChart(w, res.Runs) }))
	}
	return errors.Join(append([]error{runErr}, errs...)...)
}

// writeFile writes a result file and says where it went.
func writeFile(stdout io.Writer, what, path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	fmt.Fprintf(stdout, "wrote %s to %s\n", what, path)
	return nil
}

func fmtRate(n int64) string {
	if n <= 0 {
		return "unlimited"
	}
	return fmtBytes(n) + "/s"
}

// isTerminal reports whether f is a character device (a terminal), the
// check golang.org/x/term would make, without that dependency.
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
