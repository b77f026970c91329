// Package preheat seeds an image's blobs into the swarm before anyone pulls
// it. It serves the API that Harbor's Kraken preheat driver calls (GET
// /health, POST /registry/notifications) and that a distribution registry
// calls for its push notifications: for every pushed manifest it fetches the
// manifest (for an index, the operator's platforms), and has the config and
// every layer seeded by the supernode that owns each blob by rendezvous, so
// the first pull storm after a preheat makes no upstream blob request.
package preheat

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/rendezvous"
	"github.com/starling-oci/starling/pkg/swarmproto"
	"github.com/starling-oci/starling/pkg/upstream"
	"github.com/starling-oci/starling/pkg/wire"
)

// Protocol hands blobs to the supernode that owns them.
const Protocol protocol.ID = "/starling/preheat/1"

const (
	maxBodyBytes     = 1 << 20 // a notification envelope
	maxManifestBytes = 4 << 20
	maxBlobsPerMsg   = 4096
	fetchTimeout     = 2 * time.Minute
	// defaultMaxPending bounds manifests being preheated at once.
	defaultMaxPending = 64
)

// Seeder starts the single upstream fetch of a blob (seed.Seed).
type Seeder interface {
	Ensure(req swarmproto.TrackerRequest)
}

// Config wires a Service.
type Config struct {
	Registries *upstream.Set
	Upstream   *upstream.Client
	Seed       Seeder
	Host       host.Host
	// Supernodes are all supernodes' peer IDs (this one included): each
	// blob goes to the first in its rendezvous order.
	Supernodes []peer.ID
	// Platforms picked from an image index, as os/arch[/variant].
	Platforms []string
	// Token, if set, is the bearer token callers must send; User and
	// Password, if set, the basic credentials. Either one admits a caller;
	// with neither set the endpoint is open.
	Token, User, Password string
	// MaxPending bounds manifests being preheated at once (0: 64); past it
	// a notification is answered 503 and the registry retries it later.
	MaxPending int
	Log        *zap.Logger
}

// Service is the preheat API and its libp2p protocol.
type Service struct {
	cfg    Config
	owners []string
	ctx    context.Context // lives until Close: preheats outlive the request that asked
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	pending int            // jobs running
	results map[string]int // for metrics: preheats by result
	seeded  int
}

// New builds a Service; Close stops running preheats.
func New(cfg Config) *Service {
	if len(cfg.Platforms) == 0 {
		cfg.Platforms = []string{"linux/amd64"}
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{cfg: cfg, ctx: ctx, cancel: cancel, results: map[string]int{}}
	for _, id := range cfg.Supernodes {
		s.owners = append(s.owners, id.String())
	}
	return s
}

// Register serves Protocol on the host: blobs another supernode was asked to
// preheat and this one owns.
func (s *Service) Register() { s.cfg.Host.SetStreamHandler(Protocol, s.handleStream) }

// Close cancels running preheats and waits for them.
func (s *Service) Close() {
	s.cancel()
	s.wg.Wait()
}

// Counts returns preheat requests by result and blobs handed to seeds.
func (s *Service) Counts() (map[string]int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int, len(s.results))
	for k, v := range s.results {
		out[k] = v
	}
	return out, s.seeded
}

func (s *Service) count(result string, blobs int) {
	s.mu.Lock()
	s.results[result]++
	s.seeded += blobs
	s.mu.Unlock()
}

// Envelope is distribution's notification envelope (Harbor's Kraken driver
// sends the same shape with Go-cased field names; encoding/json matches
// field names case-insensitively, so both decode).
type Envelope struct {
	Events []Event `json:"events"`
}

// Event is one notification.
type Event struct {
	ID      string `json:"id"`
	Action  string `json:"action"`
	Target  Target `json:"target"`
	Request struct {
		Host string `json:"host"`
	} `json:"request"`
}

// Target is what an event is about.
type Target struct {
	MediaType  string `json:"mediaType"`
	Digest     string `json:"digest"`
	Repository string `json:"repository"`
	URL        string `json:"url"`
	Tag        string `json:"tag"`
}

// manifestTypes are the media types that name a manifest or an index.
var manifestTypes = map[string]bool{
	"application/vnd.docker.distribution.manifest.v2+json":      true,
	"application/vnd.docker.distribution.manifest.list.v2+json": true,
	"application/vnd.oci.image.manifest.v1+json":                true,
	"application/vnd.oci.image.index.v1+json":                   true,
}

var (
	digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
	tagRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	repoRE   = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
)

// Handler serves GET /health and POST /registry/notifications.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("POST /registry/notifications", s.notify)
	return mux
}

func (s *Service) authorized(r *http.Request) bool {
	if s.cfg.Token == "" && s.cfg.User == "" {
		return true
	}
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok && s.cfg.Token != "" {
		return subtle.ConstantTimeCompare([]byte(tok), []byte(s.cfg.Token)) == 1
	}
	if u, p, ok := r.BasicAuth(); ok && s.cfg.User != "" {
		return subtle.ConstantTimeCompare([]byte(u), []byte(s.cfg.User))&subtle.ConstantTimeCompare([]byte(p), []byte(s.cfg.Password)) == 1
	}
	return false
}

// job is one manifest to preheat.
type job struct {
	reg  upstream.Registry
	repo string
	ref  string // digest if known, else tag
}

func (s *Service) notify(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="starling-preheat"`)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		s.count("unauthorized", 0)
		return
	}
	var env Envelope
	if err := json.NewDecoder(io.LimitReader(r.Body, maxBodyBytes)).Decode(&env); err != nil {
		http.Error(w, "invalid notification envelope: "+err.Error(), http.StatusBadRequest)
		s.count("invalid", 0)
		return
	}
	var jobs []job
	for _, ev := range env.Events {
		j, ok, err := s.jobFor(ev)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			s.count("invalid", 0)
			return
		}
		if ok {
			jobs = append(jobs, j)
		}
	}
	s.mu.Lock()
	busy := s.pending+len(jobs) > s.cfg.MaxPending
	if !busy {
		s.pending += len(jobs)
	}
	s.mu.Unlock()
	if busy {
		w.Header().Set("Retry-After", "5")
		http.Error(w, "too many preheats running; retry later", http.StatusServiceUnavailable)
		s.count("busy", 0)
		return
	}
	// Answer at once (registries time notifications out quickly); the
	// fetches run on the service's own context.
	for _, j := range jobs {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				s.pending--
				s.mu.Unlock()
			}()
			s.run(j)
		}()
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]int{"accepted": len(jobs)})
}

// jobFor turns a push event for a manifest into a job; other events (pulls,
// blob pushes) are ignored.
func (s *Service) jobFor(ev Event) (job, bool, error) {
	t := ev.Target
	if !strings.EqualFold(ev.Action, "push") || (t.MediaType != "" && !manifestTypes[t.MediaType]) {
		return job{}, false, nil
	}
	if !repoRE.MatchString(t.Repository) {
		return job{}, false, fmt.Errorf("event %s: invalid repository %q", ev.ID, t.Repository)
	}
	ref := t.Digest
	if ref == "" {
		ref = t.Tag
	}
	if !digestRE.MatchString(ref) && !tagRE.MatchString(ref) {
		return job{}, false, fmt.Errorf("event %s: neither a digest nor a tag: %q", ev.ID, ref)
	}
	host := ev.Request.Host
	if u, err := url.Parse(t.URL); err == nil && u.Host != "" {
		host = u.Host
	}
	reg, ok := s.cfg.Registries.Lookup(host)
	if !ok {
		return job{}, false, fmt.Errorf("event %s: registry %q is not one this supernode fetches from", ev.ID, host)
	}
	return job{reg: reg, repo: t.Repository, ref: ref}, true, nil
}

// run fetches the manifest and hands every blob to its owner.
func (s *Service) run(j job) {
	ctx, cancel := context.WithTimeout(s.ctx, fetchTimeout)
	defer cancel()
	log := s.cfg.Log.With(zap.String("registry", j.reg.Host), zap.String("repo", j.repo), zap.String("ref", j.ref))
	blobs, err := s.imageBlobs(ctx, j)
	if err != nil {
		log.Warn("preheat failed", zap.Error(err))
		s.count("failed", 0)
		return
	}
	byOwner := map[string][]string{}
	for _, d := range blobs {
		owner := s.cfg.Host.ID().String()
		if len(s.owners) > 0 {
			owner = rendezvous.Rank(d, s.owners)[0]
		}
		byOwner[owner] = append(byOwner[owner], d)
	}
	var errs []error
	for owner, ds := range byOwner {
		if owner == s.cfg.Host.ID().String() {
			s.seed(j.reg.Host, j.repo, ds)
			continue
		}
		if err := s.forward(ctx, owner, Request{Registry: j.reg.Host, Repo: j.repo, Digests: ds}); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		log.Warn("preheat: some owners were not reached", zap.Error(err))
		s.count("failed", len(blobs))
		return
	}
	log.Info("preheat: blobs handed to their seeds", zap.Int("blobs", len(blobs)), zap.Int("owners", len(byOwner)))
	s.count("ok", len(blobs))
}

func (s *Service) seed(registry, repo string, digests []string) {
	for _, d := range digests {
		s.cfg.Seed.Ensure(swarmproto.TrackerRequest{Op: "poll", Digest: d, Registry: registry, Repo: repo})
	}
}

// manifest is the part of a manifest or index preheat reads.
type manifest struct {
	MediaType string `json:"mediaType"`
	Config    struct {
		Digest string `json:"digest"`
	} `json:"config"`
	Layers []struct {
		Digest string `json:"digest"`
	} `json:"layers"`
	Manifests []struct {
		Digest   string `json:"digest"`
		Platform struct {
			OS           string `json:"os"`
			Architecture string `json:"architecture"`
			Variant      string `json:"variant"`
		} `json:"platform"`
	} `json:"manifests"`
}

const acceptAll = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"

// blobs lists the config and layers of j's image (for an index, of the
// platforms configured).
func (s *Service) imageBlobs(ctx context.Context, j job) ([]string, error) {
	m, err := s.fetch(ctx, j.reg, j.repo, j.ref)
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) == 0 {
		return imageBlobs(m)
	}
	var out []string
	for _, c := range m.Manifests {
		p := c.Platform.OS + "/" + c.Platform.Architecture
		if !platformWanted(s.cfg.Platforms, p, c.Platform.Variant) {
			continue
		}
		if !digestRE.MatchString(c.Digest) {
			return nil, fmt.Errorf("index lists an invalid digest %q", c.Digest)
		}
		cm, err := s.fetch(ctx, j.reg, j.repo, c.Digest)
		if err != nil {
			return nil, err
		}
		bs, err := imageBlobs(cm)
		if err != nil {
			return nil, err
		}
		out = append(out, bs...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("the index has none of the platforms %v", s.cfg.Platforms)
	}
	return out, nil
}

func platformWanted(want []string, osArch, variant string) bool {
	for _, w := range want {
		if w == osArch || (variant != "" && w == osArch+"/"+variant) {
			return true
		}
	}
	return false
}

func imageBlobs(m *manifest) ([]string, error) {
	out := []string{m.Config.Digest}
	for _, l := range m.Layers {
		out = append(out, l.Digest)
	}
	for _, d := range out {
		if !digestRE.MatchString(d) {
			return nil, fmt.Errorf("manifest names an invalid blob digest %q", d)
		}
	}
	return out, nil
}

func (s *Service) fetch(ctx context.Context, reg upstream.Registry, repo, ref string) (*manifest, error) {
	resp, err := s.cfg.Upstream.Do(ctx, upstream.Request{
		Registry: reg, Repo: repo, Method: http.MethodGet, Path: "manifests/" + ref,
		Header: http.Header{"Accept": {acceptAll}},
	})
	if err != nil {
		return nil, fmt.Errorf("fetch manifest %s/%s@%s: %w", reg.Host, repo, ref, err)
	}
	defer resp.Body.Close()
	var m manifest
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxManifestBytes)).Decode(&m); err != nil {
		return nil, fmt.Errorf("decode manifest %s/%s@%s: %w", reg.Host, repo, ref, err)
	}
	return &m, nil
}

// Request is the message of Protocol: blobs of one repository for the
// receiving supernode to seed.
type Request struct {
	Registry string   `json:"registry"`
	Repo     string   `json:"repo"`
	Digests  []string `json:"digests"`
}

// Response answers a Request.
type Response struct {
	Error string `json:"error,omitempty"`
}

func (s *Service) forward(ctx context.Context, owner string, req Request) error {
	pid, err := peer.Decode(owner)
	if err != nil {
		return err
	}
	st, err := s.cfg.Host.NewStream(ctx, pid, Protocol)
	if err != nil {
		return fmt.Errorf("preheat via %s: %w", owner, err)
	}
	defer st.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = st.SetDeadline(dl)
	}
	if err := wire.WriteMsg(st, &req); err != nil {
		st.Reset()
		return fmt.Errorf("preheat via %s: %w", owner, err)
	}
	var resp Response
	if err := wire.ReadMsg(st, &resp, 4<<10); err != nil {
		st.Reset()
		return fmt.Errorf("preheat via %s: %w", owner, err)
	}
	if resp.Error != "" {
		return fmt.Errorf("preheat via %s: %s", owner, resp.Error)
	}
	return nil
}

func (s *Service) handleStream(st network.Stream) {
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(30 * time.Second))
	var req Request
	if err := wire.ReadMsg(st, &req, 64+maxBlobsPerMsg*80); err != nil {
		st.Reset()
		return
	}
	resp := Response{}
	if err := s.validate(&req); err != nil {
		resp.Error = err.Error()
	} else {
		s.seed(req.Registry, req.Repo, req.Digests)
		s.count("forwarded", len(req.Digests))
	}
	if err := wire.WriteMsg(st, &resp); err != nil {
		st.Reset()
	}
}

func (s *Service) validate(req *Request) error {
	if _, ok := s.cfg.Registries.Lookup(req.Registry); !ok {
		return fmt.Errorf("registry %q is not one this supernode fetches from", req.Registry)
	}
	if !repoRE.MatchString(req.Repo) {
		return fmt.Errorf("invalid repository %q", req.Repo)
	}
	if len(req.Digests) == 0 || len(req.Digests) > maxBlobsPerMsg {
		return fmt.Errorf("%d digests", len(req.Digests))
	}
	for _, d := range req.Digests {
		if !digestRE.MatchString(d) {
			return fmt.Errorf("invalid digest %q", d)
		}
	}
	return nil
}

// Notify asks the supernode at baseURL to preheat image (a reference such
// as harbor.example.com/library/nginx:1.27 or ...@sha256:...), sending the
// same envelope a registry sends for a push. authorization is the header
// value to send ("Bearer ..." or "Basic ..."), or empty.
func Notify(ctx context.Context, client *http.Client, baseURL, image, authorization string) error {
	ref, err := name.ParseReference(image)
	if err != nil {
		return fmt.Errorf("image %q: %w", image, err)
	}
	t := Target{Repository: ref.Context().RepositoryStr(),
		URL: "https://" + ref.Context().RegistryStr() + "/v2/" + ref.Context().RepositoryStr() + "/manifests/" + ref.Identifier()}
	if d, ok := ref.(name.Digest); ok {
		t.Digest = d.DigestStr()
	} else {
		t.Tag = ref.Identifier()
	}
	body, err := json.Marshal(Envelope{Events: []Event{{ID: "starling-preheat", Action: "push", Target: t}}})
	if err != nil {
		return fmt.Errorf("encode notification: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(baseURL, "/")+"/registry/notifications", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("preheat request: %w", err)
	}
	req.Header.Set("Content-Type", "application/vnd.docker.distribution.events.v1+json")
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("preheat %s: %w", image, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("preheat %s: supernode answered %s: %s", image, resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}
