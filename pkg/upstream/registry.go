// Package upstream talks to the registries Starling mirrors: it maps the
// names clients use (containerd's ?ns=, a default for clients that send
// none) to endpoints, forwards the client's credentials or uses the
// operator's, and never talks to a registry that is not configured.
package upstream

import (
	"fmt"
	"net/url"
	"strings"
)

// Registry is one upstream registry.
type Registry struct {
	// Host is the name clients use for it, as in an image reference and in
	// containerd's ns query: "docker.io", "harbor.example.com", "127.0.0.1:5055".
	Host string
	// Endpoint is where requests go, e.g. https://registry-1.docker.io.
	Endpoint *url.URL
}

func (r Registry) String() string { return r.Host }

// dockerHub is where "docker.io" really lives.
const dockerHub = "https://registry-1.docker.io"

// ParseRegistry accepts "https://host[:port]", "http://host[:port]" or a bare
// host (HTTPS). docker.io and its aliases map to Docker Hub's API endpoint.
func ParseRegistry(s string) (Registry, error) {
	raw := strings.TrimSpace(s)
	if raw == "" {
		return Registry{}, fmt.Errorf("parse registry: empty")
	}
	if !strings.Contains(raw, "://") {
		raw = "https://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return Registry{}, fmt.Errorf("parse registry %q: %w", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return Registry{}, fmt.Errorf("parse registry %q: scheme must be http or https", s)
	}
	if u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return Registry{}, fmt.Errorf("parse registry %q: want scheme://host[:port] with nothing else", s)
	}
	host := strings.ToLower(u.Host)
	switch host {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		ep, _ := url.Parse(dockerHub)
		return Registry{Host: "docker.io", Endpoint: ep}, nil
	}
	return Registry{Host: host, Endpoint: &url.URL{Scheme: u.Scheme, Host: host}}, nil
}

// Set is the configured registries; the first is the default.
type Set struct {
	regs []Registry
}

// NewSet parses the configured registry list.
func NewSet(specs []string) (*Set, error) {
	if len(specs) == 0 {
		return nil, fmt.Errorf("no upstream registry configured")
	}
	s := &Set{}
	seen := map[string]bool{}
	for _, spec := range specs {
		r, err := ParseRegistry(spec)
		if err != nil {
			return nil, err
		}
		if seen[r.Host] {
			return nil, fmt.Errorf("registry %s listed twice", r.Host)
		}
		seen[r.Host] = true
		s.regs = append(s.regs, r)
	}
	return s, nil
}

// Lookup finds the registry a client names with ns; an empty ns means the
// default. It returns false for a registry that is not configured: the
// mirror must never become an open proxy.
func (s *Set) Lookup(ns string) (Registry, bool) {
	if ns == "" {
		return s.regs[0], true
	}
	ns = strings.ToLower(ns)
	switch ns {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		ns = "docker.io"
	}
	for _, r := range s.regs {
		if r.Host == ns {
			return r, true
		}
	}
	return Registry{}, false
}

// All returns the configured registries, default first.
func (s *Set) All() []Registry { return append([]Registry(nil), s.regs...) }
