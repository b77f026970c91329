package upstream

import "testing"

func TestParseRegistry(t *testing.T) {
	for _, tc := range []struct {
		in, host, endpoint string
		bad                bool
	}{
		{in: "https://harbor.example.com", host: "harbor.example.com", endpoint: "https://harbor.example.com"},
		{in: "http://127.0.0.1:5055", host: "127.0.0.1:5055", endpoint: "http://127.0.0.1:5055"},
		{in: "ghcr.io", host: "ghcr.io", endpoint: "https://ghcr.io"},
		{in: "docker.io", host: "docker.io", endpoint: "https://registry-1.docker.io"},
		{in: "https://index.docker.io/", host: "docker.io", endpoint: "https://registry-1.docker.io"},
		{in: "Quay.IO", host: "quay.io", endpoint: "https://quay.io"},
		{in: "", bad: true},
		{in: "ftp://x", bad: true},
		{in: "https://user:pw@host", bad: true},
		{in: "https://host/path", bad: true},
		{in: "https://host?x=1", bad: true},
	} {
		r, err := ParseRegistry(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("ParseRegistry(%q) accepted", tc.in)
			}
			continue
		}
		if err != nil || r.Host != tc.host || r.Endpoint.String() != tc.endpoint {
			t.Errorf("ParseRegistry(%q) = %s %v, %v; want %s %s", tc.in, r.Host, r.Endpoint, err, tc.host, tc.endpoint)
		}
	}
}

func TestSetLookup(t *testing.T) {
	s, err := NewSet([]string{"http://127.0.0.1:5055", "docker.io"})
	if err != nil {
		t.Fatal(err)
	}
	for ns, want := range map[string]string{
		"":                     "127.0.0.1:5055", // clients that send no ns get the first
		"127.0.0.1:5055":       "127.0.0.1:5055",
		"docker.io":            "docker.io",
		"registry-1.docker.io": "docker.io",
		"DOCKER.IO":            "docker.io",
	} {
		if r, ok := s.Lookup(ns); !ok || r.Host != want {
			t.Errorf("Lookup(%q) = %s, %v; want %s", ns, r.Host, ok, want)
		}
	}
	for _, ns := range []string{"evil.example.com", "127.0.0.1:5056", "ghcr.io"} {
		if _, ok := s.Lookup(ns); ok {
			t.Errorf("Lookup(%q) found a registry that is not configured", ns)
		}
	}
	if _, err := NewSet([]string{"docker.io", "index.docker.io"}); err == nil {
		t.Error("the same registry twice was accepted")
	}
	if _, err := NewSet(nil); err == nil {
		t.Error("an empty registry list was accepted")
	}
}
