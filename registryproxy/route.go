package registryproxy

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"

	"github.com/starling-oci/starling/pkg/ocierr"
)

// Kind is what a request addresses.
type Kind int

const (
	// KindBase is GET /v2/, the API version check.
	KindBase Kind = iota
	// KindManifest is /v2/<name>/manifests/<tag|digest>.
	KindManifest
	// KindBlob is /v2/<name>/blobs/<digest>.
	KindBlob
)

// Route is a parsed registry API path.
type Route struct {
	Kind Kind
	Repo string
	// Ref is a tag or a digest (always a digest for blobs).
	Ref string
}

// IsDigest reports whether the reference is a digest rather than a tag.
func (r Route) IsDigest() bool { return strings.Contains(r.Ref, ":") }

var (
	// From the distribution spec: path components separated by '/'.
	repoComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$`)
	tagPattern    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	sha256Pattern = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
	digestPattern = regexp.MustCompile(`^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$`)
)

const maxRepoLen = 255

// ParseRoute parses the path of a registry API request.
func ParseRoute(path string) (Route, error) {
	if path == "/v2/" || path == "/v2" {
		return Route{Kind: KindBase}, nil
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return Route{}, ocierr.New(http.StatusNotFound, ocierr.NameUnknown, "not a registry API path")
	}
	var kind Kind
	var repo, ref string
	// The last of the two markers splits name from reference: a repository
	// may itself be called ".../manifests" or ".../blobs".
	m, b := strings.LastIndex(rest, "/manifests/"), strings.LastIndex(rest, "/blobs/")
	if m >= 0 && m > b {
		kind, repo, ref = KindManifest, rest[:m], rest[m+len("/manifests/"):]
	} else if b >= 0 {
		kind, repo, ref = KindBlob, rest[:b], rest[b+len("/blobs/"):]
	} else {
		return Route{}, ocierr.New(http.StatusNotFound, ocierr.Unsupported, "only manifests and blobs are served by this mirror")
	}
	if err := validateRepo(repo); err != nil {
		return Route{}, err
	}
	switch {
	case kind == KindBlob && !digestPattern.MatchString(ref):
		return Route{}, ocierr.New(http.StatusBadRequest, ocierr.DigestInvalid, "invalid digest %q", ref)
	case kind == KindBlob && !sha256Pattern.MatchString(ref):
		return Route{}, ocierr.New(http.StatusBadRequest, ocierr.DigestInvalid, "only sha256 digests are supported")
	case kind == KindManifest && strings.Contains(ref, ":") && !sha256Pattern.MatchString(ref):
		return Route{}, ocierr.New(http.StatusBadRequest, ocierr.DigestInvalid, "invalid or unsupported manifest digest %q", ref)
	case kind == KindManifest && !strings.Contains(ref, ":") && !tagPattern.MatchString(ref):
		return Route{}, ocierr.New(http.StatusBadRequest, ocierr.ManifestInvalid, "invalid tag %q", ref)
	}
	return Route{Kind: kind, Repo: repo, Ref: ref}, nil
}

func validateRepo(repo string) error {
	if repo == "" || len(repo) > maxRepoLen {
		return ocierr.New(http.StatusBadRequest, ocierr.NameInvalid, "invalid repository name length")
	}
	for _, c := range strings.Split(repo, "/") {
		if !repoComponent.MatchString(c) {
			return ocierr.New(http.StatusBadRequest, ocierr.NameInvalid, "invalid repository name %q", repo)
		}
	}
	return nil
}

// ByteRange is an inclusive byte range within a blob.
type ByteRange struct{ Start, End int64 }

// Len returns the number of bytes in the range.
func (r ByteRange) Len() int64 { return r.End - r.Start + 1 }

// ParseRange interprets a Range header against a blob of the given size.
// It returns ok=false when the whole blob should be sent (no header, a
// header that is not a single bytes range, which RFC 9110 lets a server
// ignore), and an error only for a range that cannot be satisfied (416).
func ParseRange(header string, size int64) (r ByteRange, ok bool, err error) {
	spec, found := strings.CutPrefix(strings.TrimSpace(header), "bytes=")
	if !found || strings.Contains(spec, ",") {
		return ByteRange{}, false, nil
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return ByteRange{}, false, nil
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	unsatisfiable := fmt.Errorf("range %q not satisfiable for %d bytes", header, size)
	switch {
	case first == "" && last == "":
		return ByteRange{}, false, nil
	case first == "": // suffix: the last n bytes
		n, perr := parseNonNegative(last)
		if perr != nil {
			return ByteRange{}, false, nil
		}
		if n == 0 || size == 0 {
			return ByteRange{}, false, unsatisfiable
		}
		return ByteRange{Start: max(0, size-n), End: size - 1}, true, nil
	default:
		start, perr := parseNonNegative(first)
		if perr != nil {
			return ByteRange{}, false, nil
		}
		end := size - 1
		if last != "" {
			if end, perr = parseNonNegative(last); perr != nil || end < start {
				return ByteRange{}, false, nil
			}
			end = min(end, size-1)
		}
		if start >= size {
			return ByteRange{}, false, unsatisfiable
		}
		return ByteRange{Start: start, End: end}, true, nil
	}
}

func parseNonNegative(s string) (int64, error) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a number: %q", s)
	}
	return strconv.ParseInt(s, 10, 64)
}
