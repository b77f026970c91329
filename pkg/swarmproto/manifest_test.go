package swarmproto

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/starling-oci/starling/pkg/wire"
)

func TestManifestRequestValidate(t *testing.T) {
	digest := "sha256:" + strings.Repeat("a", 64)
	for _, tc := range []struct {
		req ManifestRequest
		ok  bool
	}{
		{ManifestRequest{Registry: "127.0.0.1:5000", Repo: "team/app", Ref: "v1"}, true},
		{ManifestRequest{Registry: "docker.io", Repo: "library/alpine", Ref: digest, Authorization: "Bearer x"}, true},
		{ManifestRequest{Registry: "", Repo: "app", Ref: "v1"}, false},
		{ManifestRequest{Registry: "Evil.example/x", Repo: "app", Ref: "v1"}, false},
		{ManifestRequest{Registry: "r.io", Repo: "App", Ref: "v1"}, false},
		{ManifestRequest{Registry: "r.io", Repo: "app", Ref: ".hidden"}, false},
		{ManifestRequest{Registry: "r.io", Repo: "app", Ref: "sha256:short"}, false},
		{ManifestRequest{Registry: "r.io", Repo: "app", Ref: "v1", Authorization: strings.Repeat("x", 17<<10)}, false},
	} {
		if err := tc.req.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v, want ok=%v", tc.req, err, tc.ok)
		}
	}
}

func TestManifestResponseValidate(t *testing.T) {
	body := []byte(`{"schemaVersion":2}`)
	sum := sha256.Sum256(body)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	other := "sha256:" + strings.Repeat("b", 64)
	byTag := &ManifestRequest{Registry: "r.io", Repo: "app", Ref: "v1"}
	byDigest := &ManifestRequest{Registry: "r.io", Repo: "app", Ref: digest}
	byOther := &ManifestRequest{Registry: "r.io", Repo: "app", Ref: other}
	mt := "application/vnd.oci.image.manifest.v1+json"
	for _, tc := range []struct {
		name string
		req  *ManifestRequest
		resp ManifestResponse
		ok   bool
	}{
		{"tag", byTag, ManifestResponse{Digest: digest, MediaType: mt, Body: body}, true},
		{"digest", byDigest, ManifestResponse{Digest: digest, MediaType: mt, Body: body}, true},
		{"stale tag", byTag, ManifestResponse{Digest: digest, Body: body, Stale: true}, true},
		{"content type with parameters", byTag, ManifestResponse{Digest: digest, MediaType: "application/json; charset=utf-8", Body: body}, true},
		{"refusal", byTag, ManifestResponse{Error: "denied", Status: 401}, true},
		{"body does not hash to the digest", byTag, ManifestResponse{Digest: other, Body: body}, false},
		{"another digest than asked", byOther, ManifestResponse{Digest: digest, Body: body}, false},
		{"no body", byTag, ManifestResponse{Digest: digest}, false},
		{"too large", byTag, ManifestResponse{Digest: digest, Body: bytes.Repeat([]byte{' '}, MaxManifestBytes+1)}, false},
		{"bad media type", byTag, ManifestResponse{Digest: digest, MediaType: "text/html\r\nX: y", Body: body}, false},
		{"stale digest", byDigest, ManifestResponse{Digest: digest, Body: body, Stale: true}, false},
		{"error with a body", byTag, ManifestResponse{Error: "x", Digest: digest, Body: body}, false},
		{"error with a success status", byTag, ManifestResponse{Error: "x", Status: 200}, false},
	} {
		if err := tc.resp.Validate(tc.req); (err == nil) != tc.ok {
			t.Errorf("%s: Validate() = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// The largest manifest fits the response cap once framed; the request cap
// holds the largest valid request.
func TestManifestMessagesFitTheirCaps(t *testing.T) {
	body := bytes.Repeat([]byte{'{'}, MaxManifestBytes)
	var buf bytes.Buffer
	if err := wire.WriteMsg(&buf, ManifestResponse{Digest: "sha256:" + strings.Repeat("a", 64), MediaType: strings.Repeat("a", 255), Body: body}); err != nil {
		t.Fatal(err)
	}
	var resp ManifestResponse
	if err := wire.ReadMsg(&buf, &resp, MaxManifestResponseBytes); err != nil {
		t.Fatalf("a %d-byte manifest does not fit the response cap: %v", MaxManifestBytes, err)
	}
	buf.Reset()
	req := ManifestRequest{Registry: strings.Repeat("a", 255), Repo: strings.Repeat("a", 255), Ref: strings.Repeat("t", 128), Authorization: strings.Repeat("x", 16<<10)}
	if err := wire.WriteMsg(&buf, req); err != nil {
		t.Fatal(err)
	}
	if err := wire.ReadMsg(&buf, &ManifestRequest{}, MaxManifestRequestBytes); err != nil {
		t.Fatalf("the largest request does not fit the request cap: %v", err)
	}
}
