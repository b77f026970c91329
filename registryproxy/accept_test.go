package registryproxy

import "testing"

func TestAccepts(t *testing.T) {
	const (
		index    = "application/vnd.oci.image.index.v1+json"
		manifest = "application/vnd.docker.distribution.manifest.v2+json"
	)
	for _, tc := range []struct {
		accept    []string
		mediaType string
		want      bool
	}{
		{nil, index, true}, // no Accept: anything
		{[]string{manifest}, "", true},
		{[]string{manifest}, manifest, true},
		{[]string{manifest}, index, false},
		{[]string{manifest + ", " + index}, index, true},         // one header, a list
		{[]string{manifest, index + ";q=0.5"}, index, true},      // several headers, parameters
		{[]string{"application/*"}, manifest, true},              // wildcard subtype
		{[]string{manifest, "*/*"}, index, true},                 // containerd ends with */*
		{[]string{manifest}, manifest + "; charset=utf-8", true}, // parameters on the type
		{[]string{"text/*"}, manifest, false},
	} {
		if got := accepts(tc.accept, tc.mediaType); got != tc.want {
			t.Errorf("accepts(%q, %q) = %v, want %v", tc.accept, tc.mediaType, got, tc.want)
		}
	}
}
