// Package addrfile writes the addresses a process bound, so that scripts
// and tests can start it on port 0 and learn where it listens.
package addrfile

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Addrs is the file's content.
type Addrs struct {
	Mirror  string   `json:"mirror,omitempty"`
	P2P     []string `json:"p2p,omitempty"`
	Metrics string   `json:"metrics,omitempty"` // the metrics and health listener
	HTTP    string   `json:"http,omitempty"`    // the supernode's status and preheat API
}

// Write replaces path atomically, so a reader never sees half a file.
func Write(path string, a Addrs) error {
	b, err := json.Marshal(a)
	if err != nil {
		return fmt.Errorf("encode addresses: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".addr-*")
	if err != nil {
		return fmt.Errorf("write address file: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write address file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write address file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write address file: %w", err)
	}
	return nil
}
