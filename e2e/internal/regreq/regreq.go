// Package regreq is the registry-request count that e2e/pullstorm (a real
// registry) and e2e/simulate (a simulated one) both report, so their -json
// outputs stay comparable field by field.
package regreq

import "fmt"

// Counts are the requests a registry had, by kind. Manifest GETs are what
// registries such as Docker Hub count as pulls against their rate limits
// (HEADs are not); other is mostly the token flow's /v2/ ping.
type Counts struct {
	ManifestGet  int64 `json:"manifest_get"`
	ManifestHead int64 `json:"manifest_head"`
	BlobGet      int64 `json:"blob_get"`
	BlobHead     int64 `json:"blob_head"`
	Other        int64 `json:"other"`
}

// Total is every request counted.
func (c Counts) Total() int64 {
	return c.ManifestGet + c.ManifestHead + c.BlobGet + c.BlobHead + c.Other
}

func (c Counts) String() string {
	return fmt.Sprintf("%d (manifest GET %d, manifest HEAD %d, blob GET %d, blob HEAD %d, other %d)",
		c.Total(), c.ManifestGet, c.ManifestHead, c.BlobGet, c.BlobHead, c.Other)
}
