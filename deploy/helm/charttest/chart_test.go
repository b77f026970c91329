// Package charttest renders deploy/helm/starling with Helm's own Go engine
// and decodes every object strictly into its Kubernetes (or Prometheus
// operator) Go type: an unknown or misspelt field is an error, as it would
// be for `kubectl apply --validate=strict`. It also decodes the kustomize
// manifests under deploy/kubernetes the same way, and loads the agent and
// supernode configuration the chart writes with the binaries' own loader.
//
// It is a module of its own so that Helm and the Kubernetes API modules
// never reach the daemons' build; `make test` runs it.
package charttest

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"

	"github.com/starling-oci/starling/agent"
	"github.com/starling-oci/starling/pkg/config"
	"github.com/starling-oci/starling/pkg/p2p"
	"github.com/starling-oci/starling/supernode"
)

const (
	chartDir  = "../starling"
	release   = "sl"
	namespace = "starling-test"
)

// object is one decoded manifest.
type object struct {
	source string // template path and document index
	kind   string
	name   string
	obj    any
}

// render renders the chart with values overriding values.yaml, the way
// `helm template` / `helm install` would.
func render(t *testing.T, values map[string]any) ([]object, map[string]string) {
	t.Helper()
	out, err := renderErr(values)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	var objs []object
	for path, text := range out {
		if !strings.HasSuffix(path, ".yaml") {
			continue
		}
		for i, doc := range strings.Split(text, "\n---") {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			objs = append(objs, decodeStrict(t, fmt.Sprintf("%s#%d", path, i), []byte(doc)))
		}
	}
	return objs, out
}

func renderErr(values map[string]any) (map[string]string, error) {
	chrt, err := loader.Load(chartDir)
	if err != nil {
		return nil, fmt.Errorf("load chart: %w", err)
	}
	vals, err := chartutil.ToRenderValues(chrt, values, chartutil.ReleaseOptions{
		Name: release, Namespace: namespace, Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, fmt.Errorf("values: %w", err)
	}
	// Strict: a template that reads a value missing from values.yaml fails.
	return engine.Engine{Strict: true}.Render(chrt, vals)
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// decodeStrict decodes one manifest into its Go API type; unknown fields,
// duplicate keys and unknown kinds fail the test.
func decodeStrict(t *testing.T, source string, doc []byte) object {
	t.Helper()
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		t.Fatalf("%s: %v\n%s", source, err, doc)
	}
	var obj any
	switch meta.APIVersion + " " + meta.Kind {
	case "v1 ConfigMap":
		obj = &corev1.ConfigMap{}
	case "v1 Secret":
		obj = &corev1.Secret{}
	case "v1 Service":
		obj = &corev1.Service{}
	case "v1 Namespace":
		obj = &corev1.Namespace{}
	case "apps/v1 DaemonSet":
		obj = &appsv1.DaemonSet{}
	case "apps/v1 StatefulSet":
		obj = &appsv1.StatefulSet{}
	case "policy/v1 PodDisruptionBudget":
		obj = &policyv1.PodDisruptionBudget{}
	case "monitoring.coreos.com/v1 ServiceMonitor":
		obj = &monitoringv1.ServiceMonitor{}
	case "monitoring.coreos.com/v1 PrometheusRule":
		obj = &monitoringv1.PrometheusRule{}
	default:
		t.Fatalf("%s: unexpected object %s %s", source, meta.APIVersion, meta.Kind)
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		t.Fatalf("%s: %s %s: %v\n%s", source, meta.Kind, meta.Metadata.Name, err, doc)
	}
	if meta.Metadata.Name == "" {
		t.Errorf("%s: %s without a name", source, meta.Kind)
	}
	return object{source: source, kind: meta.Kind, name: meta.Metadata.Name, obj: obj}
}

func find[T any](t *testing.T, objs []object, name string) T {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.obj.(T); ok && o.name == name {
			return v
		}
	}
	var zero T
	t.Fatalf("no %T named %s among %s", zero, name, listObjects(objs))
	return zero
}

func count[T any](objs []object) int {
	n := 0
	for _, o := range objs {
		if _, ok := o.obj.(T); ok {
			n++
		}
	}
	return n
}

func listObjects(objs []object) string {
	var s []string
	for _, o := range objs {
		s = append(s, o.kind+"/"+o.name)
	}
	slices.Sort(s)
	return strings.Join(s, ", ")
}

// loadConfig loads YAML as the binaries do (config.Load: unknown keys are
// errors) with the extra command-line args the chart passes.
func loadConfig(t *testing.T, yamlText string, cfg any, bind func(*flag.FlagSet), args ...string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte(yamlText), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if err := config.Load(fs, append([]string{"--config", path}, args...), cfg, bind); err != nil {
		t.Fatalf("the binary rejects the chart's config: %v\n%s", err, yamlText)
	}
}

func TestDefaultValues(t *testing.T) {
	objs, out := render(t, nil)
	full := release + "-starling"

	ds := find[*appsv1.DaemonSet](t, objs, full+"-agent")
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork || pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("agent pod: hostNetwork %v, dnsPolicy %q", pod.HostNetwork, pod.DNSPolicy)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("agent pod mounts a service-account token")
	}
	if len(pod.InitContainers) != 1 || pod.InitContainers[0].Name != "configure" ||
		!slices.Contains(pod.InitContainers[0].Args, "--runtime=containerd") || pod.InitContainers[0].Args[0] != "configure" {
		t.Fatalf("agent init containers: %+v", pod.InitContainers)
	}
	if ds.Spec.Template.Annotations["checksum/config"] == "" {
		t.Error("agent pods carry no config checksum")
	}
	checkContainers(t, "agent", pod)

	sts := find[*appsv1.StatefulSet](t, objs, full+"-supernode")
	svc := find[*corev1.Service](t, objs, sts.Spec.ServiceName)
	if svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses {
		t.Errorf("supernode Service %s: clusterIP %q, publishNotReadyAddresses %v; want headless", svc.Name, svc.Spec.ClusterIP, svc.Spec.PublishNotReadyAddresses)
	}
	checkContainers(t, "supernode", sts.Spec.Template.Spec)
	find[*policyv1.PodDisruptionBudget](t, objs, full+"-supernode")
	find[*corev1.Service](t, objs, full+"-agent-metrics")
	find[*corev1.Service](t, objs, full+"-supernode-metrics")
	if n := count[*monitoringv1.ServiceMonitor](objs) + count[*monitoringv1.PrometheusRule](objs); n != 0 {
		t.Errorf("%d Prometheus operator objects by default; they need its CRDs, so they are opt-in", n)
	}

	// The generated swarm key is in the go-libp2p format the binaries read.
	sec := find[*corev1.Secret](t, objs, full+"-swarm-key")
	if k := string(sec.Data["swarm.key"]); !regexp.MustCompile(`^/key/swarm/psk/1\.0\.0/\n/base16/\n[0-9a-f]{64}\n$`).MatchString(k) {
		t.Errorf("swarm key %q is not a libp2p pre-shared key", k)
	}
	if sec.Annotations["helm.sh/resource-policy"] != "keep" {
		t.Error("the swarm key Secret would be deleted on uninstall or regenerated")
	}

	// The configuration the chart writes loads in the real binaries.
	acm := find[*corev1.ConfigMap](t, objs, full+"-agent")
	acfg := agent.DefaultConfig()
	loadConfig(t, acm.Data["agent.yaml"], &acfg, acfg.BindFlags, "--p2p-listen=/ip4/10.0.0.1/tcp/4002")
	if err := acfg.Validate(); err != nil {
		t.Errorf("agent config: %v", err)
	}
	if len(acfg.Supernodes.Values) != 0 {
		t.Errorf("agent has supernodes %v without peer IDs", acfg.Supernodes.Values)
	}
	if acfg.MetricsListen != ":9402" || int64(acfg.CacheSize) != 50<<30 {
		t.Errorf("agent config: metrics %q, cache %d", acfg.MetricsListen, acfg.CacheSize)
	}
	scm := find[*corev1.ConfigMap](t, objs, full+"-supernode")
	scfg := supernode.DefaultConfig()
	loadConfig(t, scm.Data["supernode.yaml"], &scfg, scfg.BindFlags)
	if err := scfg.Validate(); err != nil {
		t.Errorf("supernode config: %v", err)
	}

	// The dashboard ships whole.
	dash := find[*corev1.ConfigMap](t, objs, full+"-dashboard")
	if dash.Labels["grafana_dashboard"] != "1" || !json.Valid([]byte(dash.Data["starling.json"])) {
		t.Errorf("dashboard ConfigMap: labels %v, valid JSON %v", dash.Labels, json.Valid([]byte(dash.Data["starling.json"])))
	}
	if !strings.Contains(out["starling/templates/NOTES.txt"], "P2P IS OFF") {
		t.Error("NOTES do not say how to turn P2P on")
	}
}

// checkContainers: read-only root, probes on /livez and /readyz through a
// declared port, GOMEMLIMIT from the memory limit.
func checkContainers(t *testing.T, role string, pod corev1.PodSpec) {
	t.Helper()
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s container %s: root filesystem writable or privilege escalation allowed", role, c.Name)
		}
	}
	c := pod.Containers[0]
	ports := map[string]bool{}
	for _, p := range c.Ports {
		ports[p.Name] = true
	}
	for name, pr := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if pr == nil || pr.HTTPGet == nil || !ports[pr.HTTPGet.Port.String()] {
			t.Errorf("%s %s probe: %+v (ports %v)", role, name, pr, ports)
			continue
		}
		want := "/livez"
		if name == "readiness" {
			want = "/readyz"
		}
		if pr.HTTPGet.Path != want {
			t.Errorf("%s %s probe path %s, want %s", role, name, pr.HTTPGet.Path, want)
		}
	}
	var gomem bool
	for _, e := range c.Env {
		if e.Name == "GOMEMLIMIT" && e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil &&
			e.ValueFrom.ResourceFieldRef.Resource == "limits.memory" && e.ValueFrom.ResourceFieldRef.ContainerName == c.Name {
			gomem = true
		}
	}
	if !gomem {
		t.Errorf("%s: no GOMEMLIMIT from limits.memory", role)
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Errorf("%s: no memory limit for GOMEMLIMIT to follow", role)
	}
}

func TestPeerIDsPinSupernodes(t *testing.T) {
	ids := []any{"12D3KooWDbit491VDjqDTBRWWBCrPy5WHnctRuM7u7aLZ917pVBg", "12D3KooWG8YwZ2bKB4rbTsikKPyPxuAtov6cGHwE31x5pXtWRrhw"}
	objs, out := render(t, map[string]any{"supernode": map[string]any{"peerIDs": ids}})
	full := release + "-starling"
	acm := find[*corev1.ConfigMap](t, objs, full+"-agent")
	acfg := agent.DefaultConfig()
	loadConfig(t, acm.Data["agent.yaml"], &acfg, acfg.BindFlags)
	if len(acfg.Supernodes.Values) != 2 {
		t.Fatalf("agent supernodes %v, want one per replica", acfg.Supernodes.Values)
	}
	for i, s := range acfg.Supernodes.Values {
		ai, err := p2p.ParsePeerAddr(s)
		if err != nil {
			t.Errorf("supernode address %q: %v", s, err)
			continue
		}
		wantPrefix := fmt.Sprintf("/dns4/%s-supernode-%d.%s-supernode.%s.svc.cluster.local/tcp/4001/p2p/", full, i, full, namespace)
		if !strings.HasPrefix(s, wantPrefix) || ai.ID.String() != ids[i] {
			t.Errorf("supernode %d: %q, want %s%s (the StatefulSet pod's stable DNS name)", i, s, wantPrefix, ids[i])
		}
	}
	// The supernodes know each other, for preheat routing.
	scm := find[*corev1.ConfigMap](t, objs, full+"-supernode")
	scfg := supernode.DefaultConfig()
	loadConfig(t, scm.Data["supernode.yaml"], &scfg, scfg.BindFlags)
	if !slices.Equal(scfg.Supernodes.Values, acfg.Supernodes.Values) {
		t.Errorf("supernodes' --supernode %v, want the agents' %v", scfg.Supernodes.Values, acfg.Supernodes.Values)
	}
	if strings.Contains(out["starling/templates/NOTES.txt"], "P2P IS OFF") {
		t.Error("NOTES say P2P is off with peer IDs set")
	}

	// A config change rolls the agents.
	objs2, _ := render(t, map[string]any{"supernode": map[string]any{"peerIDs": ids}, "agent": map[string]any{"cacheSize": "10Gi"}})
	a := find[*appsv1.DaemonSet](t, objs, full+"-agent").Spec.Template.Annotations["checksum/config"]
	b := find[*appsv1.DaemonSet](t, objs2, full+"-agent").Spec.Template.Annotations["checksum/config"]
	if a == b {
		t.Error("changing agent.cacheSize leaves the pods' config checksum as it was")
	}

	if _, err := renderErr(map[string]any{"supernode": map[string]any{"peerIDs": ids[:1]}}); err == nil ||
		!strings.Contains(err.Error(), "one peer ID per supernode pod") {
		t.Errorf("one peer ID for two replicas: err = %v", err)
	}
}

func TestVariants(t *testing.T) {
	objs, _ := render(t, map[string]any{
		"swarmKey":                  map[string]any{"existingSecret": "my-swarm-key"},
		"registryCredentialsSecret": "my-creds",
		"preheat":                   map[string]any{"existingSecret": "my-preheat", "basicAuthKey": "basic"},
		"supernode": map[string]any{
			"replicas": 3, "identity": map[string]any{"existingSecret": "my-ids"},
			"podDisruptionBudget": map[string]any{"enabled": false},
			"persistence":         map[string]any{"storageClass": "fast"},
		},
		"agent": map[string]any{"configure": map[string]any{"runtimes": []any{"containerd", "crio", "docker"}, "containerdDefault": true}},
		"metrics": map[string]any{
			"serviceMonitor": map[string]any{"enabled": true, "labels": map[string]any{"release": "prom"}},
			"prometheusRule": map[string]any{"enabled": true},
			"dashboard":      map[string]any{"enabled": false},
		},
	})
	full := release + "-starling"
	if n := count[*corev1.Secret](objs); n != 0 {
		t.Errorf("%d Secrets rendered with an existing swarm key Secret", n)
	}
	if n := count[*policyv1.PodDisruptionBudget](objs); n != 0 {
		t.Errorf("PDB rendered while disabled")
	}
	sm := find[*monitoringv1.ServiceMonitor](t, objs, full)
	if sm.Labels["release"] != "prom" || len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" {
		t.Errorf("ServiceMonitor: %+v", sm)
	}
	// It selects both metrics Services.
	for _, name := range []string{full + "-agent-metrics", full + "-supernode-metrics"} {
		svc := find[*corev1.Service](t, objs, name)
		for k, v := range sm.Spec.Selector.MatchLabels {
			if svc.Labels[k] != v {
				t.Errorf("ServiceMonitor does not select %s (label %s=%q, Service has %q)", name, k, v, svc.Labels[k])
			}
		}
	}
	pr := find[*monitoringv1.PrometheusRule](t, objs, full)
	if len(pr.Spec.Groups) == 0 || len(pr.Spec.Groups[0].Rules) < 3 {
		t.Errorf("PrometheusRule has no alerts: %+v", pr.Spec)
	}

	ds := find[*appsv1.DaemonSet](t, objs, full+"-agent")
	init := ds.Spec.Template.Spec.InitContainers[0]
	for _, want := range []string{"--runtime=crio", "--runtime=docker", "--containerd-default", "--docker-config=/etc/docker/daemon.json"} {
		if !slices.Contains(init.Args, want) {
			t.Errorf("configure args %v lack %s", init.Args, want)
		}
	}
	if len(init.VolumeMounts) != 3 {
		t.Errorf("configure mounts %v, want containerd, crio and docker host paths", init.VolumeMounts)
	}
	sts := find[*appsv1.StatefulSet](t, objs, full+"-supernode")
	if *sts.Spec.Replicas != 3 || *sts.Spec.VolumeClaimTemplates[0].Spec.StorageClassName != "fast" {
		t.Errorf("StatefulSet replicas %d", *sts.Spec.Replicas)
	}
	if !slices.Contains(sts.Spec.Template.Spec.Containers[0].Args, "--identity=/etc/starling/identity/$(POD_NAME).key") {
		t.Errorf("supernode args %v: want the per-pod identity from the Secret", sts.Spec.Template.Spec.Containers[0].Args)
	}
	secrets := map[string]bool{}
	for _, v := range append(sts.Spec.Template.Spec.Volumes, ds.Spec.Template.Spec.Volumes...) {
		if v.Secret != nil {
			secrets[v.Secret.SecretName] = true
		}
	}
	scm := find[*corev1.ConfigMap](t, objs, full+"-supernode")
	scfg := supernode.DefaultConfig()
	loadConfig(t, scm.Data["supernode.yaml"], &scfg, scfg.BindFlags)
	if scfg.PreheatTokenFile != "/etc/starling/preheat/token" || scfg.PreheatBasicFile != "/etc/starling/preheat/basic" {
		t.Errorf("supernode preheat credentials: token %q, basic %q", scfg.PreheatTokenFile, scfg.PreheatBasicFile)
	}
	for _, s := range []string{"my-swarm-key", "my-creds", "my-ids", "my-preheat"} {
		if !secrets[s] {
			t.Errorf("no volume from Secret %s (have %v)", s, secrets)
		}
	}
}

// TestKustomizeManifests decodes every resource the kustomization lists
// strictly, and loads the configuration they hold with the binaries' loader.
func TestKustomizeManifests(t *testing.T) {
	dir := filepath.Join("..", "..", "kubernetes")
	raw, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Namespace  string `json:"namespace"`
		Resources  []string
		Images     []struct {
			Name, NewName, NewTag string
		}
	}
	if err := yaml.UnmarshalStrict(raw, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	var objs []object
	for _, r := range k.Resources {
		b, err := os.ReadFile(filepath.Join(dir, r))
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range bytes.Split(b, []byte("\n---")) {
			if strings.TrimSpace(stripComments(string(doc))) == "" {
				continue
			}
			objs = append(objs, decodeStrict(t, fmt.Sprintf("%s#%d", r, i), doc))
		}
	}
	acm := find[*corev1.ConfigMap](t, objs, "starling-agent")
	acfg := agent.DefaultConfig()
	loadConfig(t, acm.Data["agent.yaml"], &acfg, acfg.BindFlags)
	scm := find[*corev1.ConfigMap](t, objs, "starling-supernode")
	scfg := supernode.DefaultConfig()
	loadConfig(t, scm.Data["supernode.yaml"], &scfg, scfg.BindFlags)
	find[*appsv1.DaemonSet](t, objs, "starling-agent")
	find[*appsv1.StatefulSet](t, objs, "starling-supernode")
}
