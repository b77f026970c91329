package harness

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// PushRandomImage builds an image of `layers` random layers, each a gzipped
// tar holding one file of layerSize random bytes (so each blob is a little
// larger than layerSize), and pushes it as registryHost/repo:tag over plain
// HTTP. opts are passed to remote.Write, e.g. remote.WithAuth for a registry
// with basic auth.
//
// The config says linux/GOARCH, so that clients that match platforms
// (containerd, skopeo) accept the image without overrides.
//
// Layers are generated in memory: layers*layerSize bytes.
func PushRandomImage(t testing.TB, registryHost, repo, tag string, layers int, layerSize int64, opts ...remote.Option) (v1.Image, name.Reference) {
	t.Helper()
	img, err := RandomImage(layers, layerSize)
	if err != nil {
		t.Fatalf("generate random image: %v", err)
	}
	ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", registryHost, repo, tag), name.Insecure)
	if err != nil {
		t.Fatalf("parse image reference: %v", err)
	}
	opts = append([]remote.Option{remote.WithContext(t.Context())}, opts...)
	if err := remote.Write(ref, img, opts...); err != nil {
		t.Fatalf("push random image to %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatalf("digest of pushed image: %v", err)
	}
	t.Logf("pushed %s (%s): %d layers of %d bytes", ref, d, layers, layerSize)
	return img, ref
}

// RandomImage returns an image of `layers` random layers of layerSize bytes
// each, with a linux/GOARCH config.
func RandomImage(layers int, layerSize int64) (v1.Image, error) {
	img, err := random.Image(layerSize, int64(layers))
	if err != nil {
		return nil, fmt.Errorf("random image: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config of random image: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS = "linux"
	cfg.Architecture = runtime.GOARCH
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, fmt.Errorf("set platform of random image: %w", err)
	}
	return img, nil
}

// BlobDigests returns the digests of the image's config and layers: every
// blob a client must fetch to pull it (the manifest is not a blob).
func BlobDigests(img v1.Image) ([]v1.Hash, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("manifest of image: %w", err)
	}
	ds := []v1.Hash{m.Config.Digest}
	for _, l := range m.Layers {
		ds = append(ds, l.Digest)
	}
	return ds, nil
}
