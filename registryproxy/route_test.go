package registryproxy

import (
	"errors"
	"strings"
	"testing"

	"github.com/starling-oci/starling/pkg/ocierr"
)

var digestA = "sha256:" + strings.Repeat("a", 64)

func TestParseRoute(t *testing.T) {
	for _, tc := range []struct {
		path string
		want Route
		code string
	}{
		{"/v2/", Route{Kind: KindBase}, ""},
		{"/v2", Route{Kind: KindBase}, ""},
		{"/v2/alpine/manifests/latest", Route{KindManifest, "alpine", "latest"}, ""},
		{"/v2/library/alpine/manifests/3.19", Route{KindManifest, "library/alpine", "3.19"}, ""},
		{"/v2/a/b/c/d/manifests/" + digestA, Route{KindManifest, "a/b/c/d", digestA}, ""},
		{"/v2/team/app/blobs/" + digestA, Route{KindBlob, "team/app", digestA}, ""},
		// a repository may itself contain "blobs" or "manifests"
		{"/v2/blobs/manifests/manifests/v1", Route{KindManifest, "blobs/manifests", "v1"}, ""},
		{"/v2/e2e/manifests/blobs/" + digestA, Route{KindBlob, "e2e/manifests", digestA}, ""},
		{"/v2/e2e/blobs/manifests/" + digestA, Route{KindManifest, "e2e/blobs", digestA}, ""},
		{"/v2/my-org/my_app.x/manifests/v1", Route{KindManifest, "my-org/my_app.x", "v1"}, ""},
		{"/v2/app/blobs/sha256:abc", Route{}, ocierr.DigestInvalid},
		{"/v2/app/blobs/latest", Route{}, ocierr.DigestInvalid},
		{"/v2/app/blobs/sha512:" + strings.Repeat("a", 128), Route{}, ocierr.DigestInvalid},
		{"/v2/App/manifests/v1", Route{}, ocierr.NameInvalid},
		{"/v2//app/manifests/v1", Route{}, ocierr.NameInvalid},
		{"/v2/app/../x/manifests/v1", Route{}, ocierr.NameInvalid},
		{"/v2/-app/manifests/v1", Route{}, ocierr.NameInvalid},
		{"/v2/" + strings.Repeat("a", 256) + "/manifests/v1", Route{}, ocierr.NameInvalid},
		{"/v2/app/manifests/" + strings.Repeat("t", 129), Route{}, ocierr.ManifestInvalid},
		{"/v2/app/manifests/.hidden", Route{}, ocierr.ManifestInvalid},
		{"/v2/app/manifests/sha256:short", Route{}, ocierr.DigestInvalid},
		{"/v2/app/tags/list", Route{}, ocierr.Unsupported},
		{"/v1/app/manifests/v1", Route{}, ocierr.NameUnknown},
	} {
		got, err := ParseRoute(tc.path)
		if tc.code != "" {
			var oe *ocierr.Error
			if !errors.As(err, &oe) || oe.Code != tc.code {
				t.Errorf("ParseRoute(%q) = %v, %v; want code %s", tc.path, got, err, tc.code)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseRoute(%q) = %+v, %v; want %+v", tc.path, got, err, tc.want)
		}
	}
}

func TestParseRange(t *testing.T) {
	for _, tc := range []struct {
		header string
		size   int64
		want   ByteRange
		ok     bool
		err    bool
	}{
		{"", 100, ByteRange{}, false, false},
		{"bytes=0-9", 100, ByteRange{0, 9}, true, false},
		{"bytes=90-", 100, ByteRange{90, 99}, true, false},
		{"bytes=90-1000", 100, ByteRange{90, 99}, true, false},
		{"bytes=-10", 100, ByteRange{90, 99}, true, false},
		{"bytes=-1000", 100, ByteRange{0, 99}, true, false},
		{"bytes=99-99", 100, ByteRange{99, 99}, true, false},
		{"bytes=100-", 100, ByteRange{}, false, true},
		{"bytes=-0", 100, ByteRange{}, false, true},
		{"bytes=0-", 0, ByteRange{}, false, true},
		{"bytes=5-4", 100, ByteRange{}, false, false},     // invalid: ignored
		{"bytes=0-1,3-4", 100, ByteRange{}, false, false}, // multi-range: whole blob
		{"items=0-1", 100, ByteRange{}, false, false},
		{"bytes=a-b", 100, ByteRange{}, false, false},
		{"bytes=+1-2", 100, ByteRange{}, false, false},
		{"bytes=-", 100, ByteRange{}, false, false},
	} {
		got, ok, err := ParseRange(tc.header, tc.size)
		if (err != nil) != tc.err || ok != tc.ok || got != tc.want {
			t.Errorf("ParseRange(%q, %d) = %+v, %v, %v; want %+v, %v, err=%v", tc.header, tc.size, got, ok, err, tc.want, tc.ok, tc.err)
		}
	}
}

// FuzzParse checks that no path or range makes the parsers panic and that
// what they accept is self-consistent.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"/v2/", "/v2/a/manifests/latest", "/v2/a/b/blobs/" + digestA, "/v2/a/blobs/", "/v2/a/manifests/sha256:"} {
		f.Add(s, "bytes=0-9", int64(100))
	}
	f.Add("/v2/x", "bytes=-5", int64(3))
	f.Add("/v2//manifests/", "bytes=9223372036854775807-", int64(1))
	f.Fuzz(func(t *testing.T, path, rng string, size int64) {
		if r, err := ParseRoute(path); err == nil && r.Kind != KindBase {
			if r.Repo == "" || len(r.Repo) > maxRepoLen || validateRepo(r.Repo) != nil {
				t.Fatalf("accepted bad repo %q from %q", r.Repo, path)
			}
			if r.Kind == KindBlob && !sha256Pattern.MatchString(r.Ref) {
				t.Fatalf("accepted bad blob digest %q", r.Ref)
			}
		}
		if size < 0 {
			return
		}
		br, ok, err := ParseRange(rng, size)
		if ok && (err != nil || br.Start < 0 || br.End >= size || br.Start > br.End) {
			t.Fatalf("ParseRange(%q, %d) = %+v out of bounds", rng, size, br)
		}
	})
}
