package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	crand "crypto/rand"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// testImage is the generated image, held in memory once (compressed layers)
// and pushed to the fresh registry of every mode.
type testImage struct {
	img            v1.Image
	manifestDigest v1.Hash
	blobs          []v1.Descriptor // config first, then layers
	blobBytes      int64           // sum of blob sizes: the unique bytes a pull moves
}

// makeImage builds an image of `layers` layers that together hold about
// size bytes of random data. Each layer is a tar with one random file,
// gzip-framed without compression: random data does not compress, and
// deflating it would spend CPU the benchmark needs, on every push.
func makeImage(size int64, layers int) (*testImage, error) {
	if layers < 1 {
		return nil, fmt.Errorf("-layers %d: want at least 1", layers)
	}
	per := size / int64(layers)
	if per < 1 {
		return nil, fmt.Errorf("-size %d too small for %d layers", size, layers)
	}
	var seed [32]byte
	if _, err := crand.Read(seed[:]); err != nil {
		return nil, fmt.Errorf("seed random layers: %w", err)
	}
	rng := rand.NewChaCha8(seed)
	adds := make([]mutate.Addendum, 0, layers)
	for i := range layers {
		n := per
		if i == layers-1 {
			n = size - per*int64(layers-1)
		}
		gz, err := randomLayer(rng, fmt.Sprintf("pullstorm/layer-%d.bin", i), n)
		if err != nil {
			return nil, fmt.Errorf("generate layer %d: %w", i, err)
		}
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(gz)), nil
		})
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		adds = append(adds, mutate.Addendum{Layer: l, History: v1.History{CreatedBy: "starling pullstorm"}})
	}
	img, err := mutate.Append(empty.Image, adds...)
	if err != nil {
		return nil, fmt.Errorf("assemble image: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return nil, fmt.Errorf("set image platform: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("image manifest: %w", err)
	}
	d, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("image digest: %w", err)
	}
	ti := &testImage{img: img, manifestDigest: d}
	ti.blobs = append([]v1.Descriptor{m.Config}, m.Layers...)
	for _, b := range ti.blobs {
		ti.blobBytes += b.Size
	}
	return ti, nil
}

// randomLayer returns a gzip stream (stored blocks) of a tar holding one
// file of n random bytes.
func randomLayer(rng io.Reader, name string, n int64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(n + n/1000 + 4096))
	zw, err := gzip.NewWriterLevel(&buf, gzip.NoCompression)
	if err != nil {
		return nil, fmt.Errorf("gzip writer: %w", err)
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: n, Typeflag: tar.TypeReg}); err != nil {
		return nil, fmt.Errorf("tar header: %w", err)
	}
	if _, err := io.CopyN(tw, rng, n); err != nil {
		return nil, fmt.Errorf("random bytes: %w", err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("close gzip: %w", err)
	}
	return buf.Bytes(), nil
}

// push writes the image to registryURL (http(s)://host[:port]) as repo:tag.
func (ti *testImage) push(registryURL, repo, tag string, opts ...remote.Option) (name.Tag, error) {
	host, insecure, err := splitRegistryURL(registryURL)
	if err != nil {
		return name.Tag{}, err
	}
	var nopts []name.Option
	if insecure {
		nopts = append(nopts, name.Insecure)
	}
	ref, err := name.NewTag(host+"/"+repo+":"+tag, nopts...)
	if err != nil {
		return name.Tag{}, fmt.Errorf("image reference: %w", err)
	}
	if err := remote.Write(ref, ti.img, opts...); err != nil {
		return name.Tag{}, fmt.Errorf("push %s: %w", ref, err)
	}
	return ref, nil
}
