package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/tcpproxy/tcpproxy/channels/pki"
)

// The Kubernetes manifests under deploy/kubernetes are decoded with the
// API's own types, strictly, and every tcpproxy configuration in them is
// parsed by tcpproxy and checked against the pod that runs it: the
// variables it expands are set, the files and the SPIFFE Workload API
// socket it names are mounted, the certificate (or the SVID SPIRE or
// csi-driver-spiffe would issue) names the instance, the probes ask the
// admin endpoint from inside the pod, and Prometheus is pointed at the
// metrics listener. (Kubernetes' packages are used by this test only.)

// manifestNamespace is the namespace the manifests are applied to, for
// the pods' ${POD_NAMESPACE} and their SPIFFE IDs.
const manifestNamespace = "default"

const manifestsDir = "../../deploy/kubernetes"

// cert-manager's resources (cert-manager.io/v1) are not in k8s.io/api: the
// fields the manifests may use, decoded strictly as well.
type certManagerIssuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SelfSigned *struct{} `json:"selfSigned,omitempty"`
		CA         *struct {
			SecretName string `json:"secretName"`
		} `json:"ca,omitempty"`
	} `json:"spec"`
}

type certManagerCertificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		IsCA        bool     `json:"isCA,omitempty"`
		CommonName  string   `json:"commonName,omitempty"`
		SecretName  string   `json:"secretName"`
		Duration    string   `json:"duration,omitempty"`
		RenewBefore string   `json:"renewBefore,omitempty"`
		DNSNames    []string `json:"dnsNames,omitempty"`
		URIs        []string `json:"uris,omitempty"`
		Usages      []string `json:"usages,omitempty"`
		PrivateKey  *struct {
			Algorithm      string `json:"algorithm,omitempty"`
			Size           int    `json:"size,omitempty"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey,omitempty"`
		IssuerRef struct {
			Name  string `json:"name"`
			Kind  string `json:"kind,omitempty"`
			Group string `json:"group,omitempty"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// clusterSPIFFEID is spire-controller-manager's ClusterSPIFFEID
// (spire.spiffe.io/v1alpha1): the registration entries SPIRE makes for
// the pods it selects.
type clusterSPIFFEID struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SPIFFEIDTemplate          string                `json:"spiffeIDTemplate"`
		PodSelector               *metav1.LabelSelector `json:"podSelector,omitempty"`
		NamespaceSelector         *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
		WorkloadSelectorTemplates []string              `json:"workloadSelectorTemplates,omitempty"`
		DNSNameTemplates          []string              `json:"dnsNameTemplates,omitempty"`
		FederatesWith             []string              `json:"federatesWith,omitempty"`
		TTL                       string                `json:"ttl,omitempty"`
		JWTTTL                    string                `json:"jwtTtl,omitempty"`
		Admin                     bool                  `json:"admin,omitempty"`
		Downstream                bool                  `json:"downstream,omitempty"`
		AutoPopulateDNSNames      bool                  `json:"autoPopulateDNSNames,omitempty"`
		ClassName                 string                `json:"className,omitempty"`
		Fallback                  bool                  `json:"fallback,omitempty"`
		Hint                      string                `json:"hint,omitempty"`
	} `json:"spec"`
}

// spiffeIDFor renders the template for a pod as spire-controller-manager
// does, in trust domain td.
func (c *clusterSPIFFEID) spiffeIDFor(td, podName string, pt *corev1.PodTemplateSpec) (spiffeid.ID, error) {
	tmpl, err := template.New(c.Name).Option("missingkey=error").Parse(c.Spec.SPIFFEIDTemplate)
	if err != nil {
		return spiffeid.ID{}, err
	}
	meta := pt.ObjectMeta
	meta.Name, meta.Namespace = podName, manifestNamespace
	spec := pt.Spec
	if spec.ServiceAccountName == "" {
		spec.ServiceAccountName = "default"
	}
	var b strings.Builder
	if err := tmpl.Execute(&b, map[string]any{"TrustDomain": td, "PodMeta": &meta, "PodSpec": &spec}); err != nil {
		return spiffeid.ID{}, err
	}
	return spiffeid.FromString(b.String())
}

// selects reports whether c makes an entry for pods labelled so.
func (c *clusterSPIFFEID) selects(podLabels map[string]string) (bool, error) {
	if c.Spec.PodSelector == nil {
		return true, nil
	}
	sel, err := metav1.LabelSelectorAsSelector(c.Spec.PodSelector)
	if err != nil {
		return false, fmt.Errorf("ClusterSPIFFEID %s: podSelector: %w", c.Name, err)
	}
	return sel.Matches(labels.Set(podLabels)), nil
}

// certManagerUsages are cert-manager's key usages (KeyUsage).
var certManagerUsages = []string{
	"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
	"data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
	"server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
	"ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}

// manifests is what the files hold, by kind.
type manifests struct {
	configMaps      map[string]*corev1.ConfigMap
	serviceAccounts map[string]*corev1.ServiceAccount
	pods            map[string]*corev1.PodTemplateSpec // by "Kind/name"
	replicas        map[string]int32                   // by "Kind/name"; DaemonSets: none
	issuers         map[string]*certManagerIssuer
	certificates    map[string]*certManagerCertificate
	spiffeIDs       map[string]*clusterSPIFFEID
}

var k8sDecoder = func() runtime.Decoder {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}()

// decodeManifests decodes every document of every file; files maps names
// to contents.
func decodeManifests(files map[string][]byte) (*manifests, []error) {
	m := &manifests{
		configMaps: map[string]*corev1.ConfigMap{}, serviceAccounts: map[string]*corev1.ServiceAccount{},
		pods: map[string]*corev1.PodTemplateSpec{}, replicas: map[string]int32{},
		issuers: map[string]*certManagerIssuer{}, certificates: map[string]*certManagerCertificate{},
		spiffeIDs: map[string]*clusterSPIFFEID{},
	}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if ext := path.Ext(name); ext != ".yaml" && ext != ".yml" {
			errs = append(errs, fmt.Errorf("%s: not a YAML manifest", name))
			continue
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(files[name])))
		for i := 1; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: document %d: %w", name, i, err))
				break
			}
			if err := m.add(doc); err != nil {
				errs = append(errs, fmt.Errorf("%s: document %d: %w", name, i, err))
			}
		}
	}
	return m, errs
}

func (m *manifests) add(doc []byte) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return err
	}
	if tm.Kind == "" && len(bytes.TrimSpace(stripComments(doc))) == 0 {
		return nil // comments only
	}
	if tm.APIVersion == "cert-manager.io/v1" {
		switch tm.Kind {
		case "Issuer", "ClusterIssuer":
			var o certManagerIssuer
			if err := decodeStrict(doc, &o); err != nil {
				return fmt.Errorf("%s %s: %w", tm.Kind, o.Name, err)
			}
			m.issuers[o.Name] = &o
		case "Certificate":
			var o certManagerCertificate
			if err := decodeStrict(doc, &o); err != nil {
				return fmt.Errorf("Certificate %s: %w", o.Name, err)
			}
			m.certificates[o.Name] = &o
		default:
			return fmt.Errorf("cert-manager kind %q is not checked by this test", tm.Kind)
		}
		return nil
	}
	if tm.APIVersion == "spire.spiffe.io/v1alpha1" {
		if tm.Kind != "ClusterSPIFFEID" {
			return fmt.Errorf("SPIRE kind %q is not checked by this test", tm.Kind)
		}
		var o clusterSPIFFEID
		if err := decodeStrict(doc, &o); err != nil {
			return fmt.Errorf("ClusterSPIFFEID %s: %w", o.Name, err)
		}
		m.spiffeIDs[o.Name] = &o
		return nil
	}
	obj, _, err := k8sDecoder.Decode(doc, nil, nil)
	if err != nil {
		return err
	}
	switch o := obj.(type) {
	case *corev1.ConfigMap:
		m.configMaps[o.Name] = o
	case *corev1.ServiceAccount:
		m.serviceAccounts[o.Name] = o
	case *appsv1.Deployment:
		m.pods["Deployment/"+o.Name] = &o.Spec.Template
		m.replicas["Deployment/"+o.Name] = ptrOr(o.Spec.Replicas, 1)
	case *appsv1.StatefulSet:
		m.pods["StatefulSet/"+o.Name] = &o.Spec.Template
		m.replicas["StatefulSet/"+o.Name] = ptrOr(o.Spec.Replicas, 1)
	case *appsv1.DaemonSet:
		m.pods["DaemonSet/"+o.Name] = &o.Spec.Template
	}
	return nil
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// decodeStrict decodes a YAML document into v as the API server would:
// field names match exactly, and unknown or duplicate fields are errors.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := sigsjson.UnmarshalStrict(j, v, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

func stripComments(doc []byte) []byte {
	var out []byte
	for line := range bytes.Lines(doc) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line...)
		}
	}
	return out
}

// sampleEnv is what ${VAR} expands to in a pod's tcpproxy configuration:
// a sample value for each variable the container sets.
func sampleEnv(pod string, c corev1.Container) map[string]string {
	env := map[string]string{"HOSTNAME": pod} // always set by the kubelet
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.name":
			env[e.Name] = pod
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace":
			env[e.Name] = manifestNamespace
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			env[e.Name] = "10.1.2.3"
		default:
			env[e.Name] = "sample"
		}
	}
	return env
}

// expandSample replaces ${VAR} with env's value, reporting the variables
// env lacks.
func expandSample(s string, env map[string]string) (string, []string) {
	var missing []string
	out := envRef.ReplaceAllStringFunc(s, func(ref string) string {
		name := ref[2 : len(ref)-1]
		v, ok := env[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	return out, missing
}

// check returns what is wrong with the manifests as a whole.
func (m *manifests) check() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	// Every tcpproxy configuration parses, whatever the pod.
	for _, cm := range m.configMaps {
		for key, data := range cm.Data {
			if path.Ext(key) != ".yaml" {
				continue
			}
			expanded := envRef.ReplaceAllString(data, "sample-0")
			if _, err := parseConfig([]byte(expanded)); err != nil {
				bad("ConfigMap %s, %s: %w", cm.Name, key, err)
			}
		}
	}
	for name, c := range m.certificates {
		s := c.Spec
		if _, ok := m.issuers[s.IssuerRef.Name]; !ok && s.IssuerRef.Kind != "ClusterIssuer" {
			bad("Certificate %s: issuer %q is not in the manifests", name, s.IssuerRef.Name)
		}
		for _, d := range []string{s.Duration, s.RenewBefore} {
			if _, err := time.ParseDuration(d); d != "" && err != nil {
				bad("Certificate %s: %w", name, err)
			}
		}
		for _, u := range s.Usages {
			if !slices.Contains(certManagerUsages, u) {
				bad("Certificate %s: %q is not a cert-manager key usage", name, u)
			}
		}
	}
	for name, c := range m.spiffeIDs {
		if c.Spec.TTL != "" {
			if _, err := time.ParseDuration(c.Spec.TTL); err != nil {
				bad("ClusterSPIFFEID %s: ttl: %w", name, err)
			}
		}
		if _, err := c.selects(nil); err != nil {
			errs = append(errs, err)
		}
	}
	for name, is := range m.issuers {
		if is.Spec.CA != nil && !slices.ContainsFunc(slices.Collect(maps.Values(m.certificates)), func(c *certManagerCertificate) bool {
			return c.Spec.IsCA && c.Spec.SecretName == is.Spec.CA.SecretName
		}) {
			bad("Issuer %s: no CA Certificate makes its Secret %q", name, is.Spec.CA.SecretName)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(m.pods)) {
		errs = append(errs, m.checkPod(name, m.pods[name])...)
	}
	return errs
}

// checkPod checks the tcpproxy containers of a pod template and every
// container's probes.
func (m *manifests) checkPod(name string, pt *corev1.PodTemplateSpec) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{name}, args...)...))
	}
	podName := strings.ToLower(strings.SplitN(name, "/", 2)[1]) + "-0"
	volumes := map[string]corev1.Volume{}
	for _, v := range pt.Spec.Volumes {
		volumes[v.Name] = v
	}
	if sa := pt.Spec.ServiceAccountName; sa != "" && m.serviceAccounts[sa] == nil {
		bad("serviceAccountName %s is not a ServiceAccount in the manifests", sa)
	}
	metricsServed := false
	for _, c := range slices.Concat(pt.Spec.InitContainers, pt.Spec.Containers) {
		for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
			if p != nil && p.HTTPGet != nil && (p.HTTPGet.Host == "127.0.0.1" || p.HTTPGet.Host == "localhost") {
				bad("container %s: an httpGet probe with host %s asks the node, not the pod; run `tcpproxy status -check` with an exec probe", c.Name, p.HTTPGet.Host)
			}
		}
		i := slices.Index(c.Args, "-config")
		if len(c.Args) == 0 || c.Args[0] != "run" || i < 0 || i+1 >= len(c.Args) {
			continue // not tcpproxy run
		}
		cfgPath := c.Args[i+1]
		// The file the container reads: a key of a mounted ConfigMap.
		mount := mountOf(c, cfgPath)
		if mount == nil || volumes[mount.Name].ConfigMap == nil {
			bad("container %s: %s is not in a mounted ConfigMap", c.Name, cfgPath)
			continue
		}
		cmName := volumes[mount.Name].ConfigMap.Name
		cm := m.configMaps[cmName]
		key := strings.TrimPrefix(strings.TrimPrefix(cfgPath, mount.MountPath), "/")
		if cm == nil || cm.Data[key] == "" {
			bad("container %s: %s: ConfigMap %s with key %s is not in the manifests", c.Name, cfgPath, cmName, key)
			continue
		}
		env := sampleEnv(podName, c)
		data, missing := expandSample(cm.Data[key], env)
		if len(missing) > 0 {
			bad("container %s: %s uses ${%s}, which the container's env does not set", c.Name, cfgPath, strings.Join(missing, "}, ${"))
			continue
		}
		cfg, err := parseConfig([]byte(data))
		if err != nil {
			bad("container %s: %s: %w", c.Name, cfgPath, err)
			continue
		}
		// Secure by default: mutual TLS, with the files mounted from a
		// certificate for this very instance, or the SPIRE agent's socket
		// and a registration that gives this pod its SVID.
		if !cfg.TLS.enabled() {
			bad("container %s: %s: no tls: sessions would run in plaintext", c.Name, cfgPath)
		}
		if s := cfg.TLS.SPIFFE; s != nil && s.Socket != "" {
			errs = append(errs, m.checkWorkloadAPI(name, podName, pt, c, volumes, cfg)...)
		}
		if cfg.Metrics != "" {
			metricsServed = true
			errs = append(errs, checkMetricsScrape(name, pt, c, cfg)...)
		}
		files := []string{cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA}
		if e := cfg.Members.Etcd; e != nil {
			files = append(files, e.TLS.Cert, e.TLS.Key, e.TLS.CA)
		}
		checked := map[string]bool{}
		for _, f := range files {
			if f == "" {
				continue
			}
			mt := mountOf(c, f)
			if mt == nil {
				bad("container %s: %s names %s, which no volume mounts", c.Name, cfgPath, f)
				continue
			}
			if checked[mt.Name] {
				continue
			}
			checked[mt.Name] = true
			errs = append(errs, m.checkCertVolume(name, c.Name, volumes[mt.Name], pt, cfg, env)...)
		}
		// The probes run `tcpproxy status` against the admin endpoint.
		if cfg.Admin == "" {
			bad("container %s: %s: no admin endpoint for the probes", c.Name, cfgPath)
		}
		for what, p := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe} {
			want := map[string]string{"readinessProbe": "-check", "livenessProbe": "-live"}[what]
			if p == nil || p.Exec == nil {
				bad("container %s: %s is not an exec probe running `tcpproxy status %s`", c.Name, what, want)
				continue
			}
			cmd := p.Exec.Command
			if len(cmd) < 2 || path.Base(cmd[0]) != "tcpproxy" || cmd[1] != "status" || !slices.Contains(cmd, want) {
				bad("container %s: %s runs %q, not `tcpproxy status %s`", c.Name, what, cmd, want)
			}
			admin := defaultAdmin
			if j := slices.Index(cmd, "-admin"); j >= 0 && j+1 < len(cmd) {
				admin = cmd[j+1]
			}
			if admin != cfg.Admin {
				bad("container %s: %s asks %s but the admin endpoint is at %q", c.Name, what, admin, cfg.Admin)
			}
		}
	}
	if pt.Annotations["prometheus.io/scrape"] == "true" && !metricsServed {
		bad("prometheus.io/scrape is \"true\" but no tcpproxy container sets metrics: (the admin endpoint is on 127.0.0.1, which Prometheus cannot reach)")
	}
	return errs
}

// checkMetricsScrape checks that Prometheus can scrape c's metrics
// listener: on an address outside the pod's loopback, declared as a
// container port, and named by the pod's prometheus.io annotations.
func checkMetricsScrape(pod string, pt *corev1.PodTemplateSpec, c corev1.Container, cfg *fileConfig) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: container %s: "+format, append([]any{pod, c.Name}, args...)...))
	}
	ap := netip.MustParseAddrPort(cfg.Metrics) // validated
	if ap.Addr().IsLoopback() {
		bad("metrics %s is on the loopback interface: only this pod reaches it; use 0.0.0.0:%d", cfg.Metrics, ap.Port())
	}
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == int32(ap.Port()) }) {
		bad("metrics port %d is not among the container's ports", ap.Port())
	}
	a := pt.Annotations
	if a["prometheus.io/scrape"] != "true" {
		bad("metrics %s is served but the pod lacks the annotation prometheus.io/scrape: \"true\"", cfg.Metrics)
	}
	if p := a["prometheus.io/port"]; p != strconv.Itoa(int(ap.Port())) {
		bad("prometheus.io/port %q is not the metrics port %d", p, ap.Port())
	}
	if p, ok := a["prometheus.io/path"]; ok && p != "/metrics" {
		bad("prometheus.io/path %q: the metrics listener serves /metrics only", p)
	}
	return errs
}

// describeID says which instance id is, and its role when it has one.
func describeID(id pki.Identity) string {
	if id.Role == "" {
		return "instance " + id.IID
	}
	return fmt.Sprintf("instance %s (role %s)", id.IID, id.Role)
}

// checkWorkloadAPI checks a pod that takes its SVID from the SPIFFE
// Workload API: the socket is mounted from the SPIFFE CSI driver (or the
// agent's host directory), and a ClusterSPIFFEID gives the pod an ID that
// the configuration maps to this very instance.
func (m *manifests) checkWorkloadAPI(pod, podName string, pt *corev1.PodTemplateSpec, c corev1.Container, volumes map[string]corev1.Volume, cfg *fileConfig) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: container %s: "+format, append([]any{pod, c.Name}, args...)...))
	}
	sock := strings.TrimPrefix(cfg.TLS.SPIFFE.socketAddr(), "unix://")
	mt := mountOf(c, sock)
	switch {
	case mt == nil:
		bad("tls.spiffe.socket %s is in no volume the container mounts", sock)
	case volumes[mt.Name].CSI != nil && volumes[mt.Name].CSI.Driver == "csi.spiffe.io":
	case volumes[mt.Name].HostPath != nil:
	default:
		bad("tls.spiffe.socket %s: volume %s is neither the SPIFFE CSI driver's (csi.spiffe.io) nor the agent's host directory", sock, mt.Name)
	}
	mapping, _ := cfg.TLS.SPIFFE.mapping() // validated
	want := pki.Identity{IID: cfg.IID, Role: cfg.Role}
	found := false
	for _, name := range slices.Sorted(maps.Keys(m.spiffeIDs)) {
		cs := m.spiffeIDs[name]
		if ok, err := cs.selects(pt.Labels); err != nil || !ok {
			continue
		}
		found = true
		id, err := cs.spiffeIDFor(cfg.TLS.SPIFFE.TrustDomain, podName, pt)
		if err != nil {
			bad("ClusterSPIFFEID %s: spiffeIDTemplate: %v", name, err)
			continue
		}
		if got, err := mapping.Identity(id); err != nil {
			bad("SPIRE would issue %s (ClusterSPIFFEID %s): %v", id, name, err)
		} else if got.IID != want.IID || mapping.HasRole() && got.Role != want.Role {
			bad("SPIRE would issue %s (ClusterSPIFFEID %s), which names %s, not this instance, %s", id, name, describeID(got), describeID(want))
		}
	}
	if !found {
		bad("no ClusterSPIFFEID in the manifests selects this pod (labels %v): SPIRE would give it no SVID", pt.Labels)
	}
	return errs
}

// checkCertVolume checks that v holds a certificate of cfg's instance:
// cert-manager's csi-driver with that identity and both TLS usages,
// cert-manager's csi-driver-spiffe whose SVID (which names the pod's
// ServiceAccount) maps to the instance, or a Secret that a cert-manager
// Certificate makes.
func (m *manifests) checkCertVolume(pod, container string, v corev1.Volume, pt *corev1.PodTemplateSpec, cfg *fileConfig, env map[string]string) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: container %s: volume %s: "+format, append([]any{pod, container, v.Name}, args...)...))
	}
	switch {
	case v.CSI != nil && v.CSI.Driver == "csi.cert-manager.io":
		attr := v.CSI.VolumeAttributes
		if is := attr["csi.cert-manager.io/issuer-name"]; m.issuers[is] == nil {
			bad("issuer %q is not in the manifests", is)
		}
		// csi-driver expands ${POD_NAME} and friends itself.
		uris, _ := expandSample(attr["csi.cert-manager.io/uri-sans"], map[string]string{"POD_NAME": env["HOSTNAME"], "POD_NAMESPACE": manifestNamespace})
		self := pki.Identity{IID: cfg.IID, Role: cfg.Role}
		want := self.URI().String()
		if s := cfg.TLS.SPIFFE; s != nil {
			mapping, _ := s.mapping() // validated
			id, _ := mapping.ID(self) // validated
			want = id.String()
		}
		if !slices.Contains(strings.Split(uris, ","), want) {
			bad("uri-sans %q do not name this instance, %s", attr["csi.cert-manager.io/uri-sans"], want)
		}
		usages := strings.Split(attr["csi.cert-manager.io/key-usages"], ",")
		for _, u := range []string{"server auth", "client auth"} {
			if !slices.Contains(usages, u) {
				bad("key-usages lack %q, which mutual TLS needs", u)
			}
		}
	case v.CSI != nil && v.CSI.Driver == "spiffe.csi.cert-manager.io":
		s := cfg.TLS.SPIFFE
		if s == nil {
			bad("csi-driver-spiffe issues SPIFFE SVIDs, which need tls.spiffe")
			break
		}
		if _, ok := m.issuers[v.CSI.VolumeAttributes["spiffe.csi.cert-manager.io/issuer-name"]]; !ok && v.CSI.VolumeAttributes["spiffe.csi.cert-manager.io/issuer-name"] != "" {
			bad("issuer %q is not in the manifests", v.CSI.VolumeAttributes["spiffe.csi.cert-manager.io/issuer-name"])
		}
		sa := pt.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		id, err := spiffeid.FromSegments(spiffeid.RequireTrustDomainFromString(s.TrustDomain), "ns", manifestNamespace, "sa", sa)
		if err != nil {
			bad("%v", err)
			break
		}
		mapping, _ := s.mapping() // validated
		self := pki.Identity{IID: cfg.IID, Role: cfg.Role}
		if got, err := mapping.Identity(id); err != nil {
			bad("csi-driver-spiffe issues %s: %v", id, err)
		} else if got.IID != self.IID || mapping.HasRole() && got.Role != self.Role {
			bad("csi-driver-spiffe issues %s to every pod of ServiceAccount %s, which names %s, not this instance, %s: "+
				"its SVIDs name the ServiceAccount, so each instance needs a ServiceAccount of its own (or use SPIRE, see spiffe-spire.yaml)", id, sa, describeID(got), describeID(self))
		} else if n, ok := m.replicas[pod]; !ok || n > 1 {
			bad("csi-driver-spiffe gives every pod of ServiceAccount %s the identity of instance %s, but %s runs %s pods: one instance, one pod",
				sa, self.IID, pod, map[bool]string{true: strconv.Itoa(int(n)), false: "one per node"}[ok])
		}
		for _, f := range []string{cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA} {
			if base := path.Base(f); !slices.Contains([]string{"tls.crt", "tls.key", "ca.crt"}, base) {
				bad("%s: csi-driver-spiffe writes tls.crt, tls.key and ca.crt", f)
			}
		}
	case v.Secret != nil:
		if !slices.ContainsFunc(slices.Collect(maps.Values(m.certificates)), func(c *certManagerCertificate) bool {
			return c.Spec.SecretName == v.Secret.SecretName
		}) {
			bad("Secret %s is made by no Certificate in the manifests", v.Secret.SecretName)
		}
	default:
		bad("holds TLS files but is neither cert-manager's csi-driver, its csi-driver-spiffe, nor a Secret")
	}
	return errs
}

// mountOf returns c's volume mount under which file lies.
func mountOf(c corev1.Container, file string) *corev1.VolumeMount {
	for i, vm := range c.VolumeMounts {
		if strings.HasPrefix(file, strings.TrimSuffix(vm.MountPath, "/")+"/") {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

func readManifests(t *testing.T) map[string][]byte {
	files := map[string][]byte{}
	require.NoError(t, filepath.WalkDir(manifestsDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		files[p] = b
		return err
	}))
	return files
}

// TestKubernetesManifests: every file under deploy/kubernetes decodes, and
// the pods it describes would run tcpproxy as its configuration expects.
func TestKubernetesManifests(t *testing.T) {
	files := readManifests(t)
	require.NotEmpty(t, files)
	m, errs := decodeManifests(files)
	require.Empty(t, errs)
	errs = m.check()
	for _, err := range errs {
		t.Error(err)
	}
	// What the files must hold, so that the test checks something.
	assert.Contains(t, m.pods, "Deployment/web")
	assert.Contains(t, m.pods, "StatefulSet/etcd")
	assert.Contains(t, m.pods, "StatefulSet/kv")
	assert.Len(t, m.configMaps, 3)
	assert.Contains(t, m.issuers, "tcpproxy-ca")
	assert.Contains(t, m.spiffeIDs, "tcpproxy-kv")
	assert.Contains(t, m.serviceAccounts, "kv")
}

// TestKubernetesManifestCSIDriverSPIFFE: the SPIRE StatefulSet switched
// to cert-manager's csi-driver-spiffe, whose SVIDs name the pod's
// ServiceAccount: with iid = pod name, every replica would get an SVID of
// another instance; with iid = ServiceAccount, it passes as the only pod
// of its ServiceAccount, and not with more replicas.
func TestKubernetesManifestCSIDriverSPIFFE(t *testing.T) {
	files := readManifests(t)
	spire := filepath.Join(manifestsDir, "spiffe-spire.yaml")
	csiDriver := [][2]string{
		{"        socket: unix:///spiffe-workload-api/spire-agent.sock\n",
			"      cert: /var/run/spiffe/tls.crt\n      key: /var/run/spiffe/tls.key\n      ca: /var/run/spiffe/ca.crt\n"},
		{"idTemplate: /ns/${POD_NAMESPACE}/sa/{role}/pod/{iid}", "idTemplate: /ns/${POD_NAMESPACE}/sa/{iid}"},
		{"{name: spiffe-workload-api, mountPath: /spiffe-workload-api, readOnly: true}", "{name: spiffe-workload-api, mountPath: /var/run/spiffe, readOnly: true}"},
		{"csi: {driver: csi.spiffe.io, readOnly: true}", "csi: {driver: spiffe.csi.cert-manager.io, readOnly: true, volumeAttributes: {spiffe.csi.cert-manager.io/fs-group: \"65532\"}}"},
	}
	check := func(edits ...[2]string) error {
		changed := maps.Clone(files)
		text := string(files[spire])
		for _, r := range slices.Concat(csiDriver, edits) {
			require.Contains(t, text, r[0])
			text = strings.Replace(text, r[0], r[1], 1)
		}
		changed[spire] = []byte(text)
		m, errs := decodeManifests(changed)
		require.Empty(t, errs)
		return errors.Join(m.check()...)
	}
	require.ErrorContains(t, check(),
		"csi-driver-spiffe issues spiffe://example.org/ns/default/sa/kv to every pod of ServiceAccount kv, which names instance kv, not this instance, instance kv-0 (role kv)")
	singleton := [2]string{"iid: ${POD_NAME}", "iid: kv"}
	require.ErrorContains(t, check(singleton),
		"csi-driver-spiffe gives every pod of ServiceAccount kv the identity of instance kv, but StatefulSet/kv runs 3 pods")
	require.NoError(t, check(singleton, [2]string{"replicas: 3", "replicas: 1"}))
}

// TestKubernetesManifestChecks: the checks catch what rots: an unknown
// field (in Kubernetes', cert-manager's and SPIRE's resources), a
// configuration that tcpproxy refuses, a variable the pod does not set, a
// certificate or SVID for another identity, a Workload API socket not
// mounted, an httpGet probe on 127.0.0.1, plaintext, metrics Prometheus
// cannot scrape.
func TestKubernetesManifestChecks(t *testing.T) {
	files := readManifests(t)
	sidecar := filepath.Join(manifestsDir, "sidecar-loopback.yaml")
	certs := filepath.Join(manifestsDir, "cert-manager.yaml")
	spire := filepath.Join(manifestsDir, "spiffe-spire.yaml")
	for _, f := range []string{sidecar, certs, spire} {
		require.Contains(t, files, f)
	}
	for _, tc := range []struct {
		name, file, old, new, want string
		more                       [][2]string // further replacements in file
	}{
		{name: "unknown field", file: sidecar, old: "replicas: 3", new: "replica: 3", want: `unknown field "spec.replica"`},
		{name: "unknown cert-manager field", file: certs, old: "isCA: true", new: "isCa: true", want: `unknown field "spec.isCa"`},
		{name: "unknown SPIRE field", file: spire, old: "spiffeIDTemplate:", new: "spiffeIdTemplate:", want: `unknown field "spec.spiffeIdTemplate"`},
		{name: "config tcpproxy refuses", file: sidecar, old: "ttl: 10s", new: "ttl: 10 seconds", want: `members.etcd.ttl (line 13): "10 seconds" is not a duration`},
		{name: "unknown config key", file: sidecar, old: "drainTimeout: 10s", new: "drainTimeOut: 10s", want: "drainTimeOut"},
		{name: "variable not set", file: sidecar, old: "advertise: ${POD_IP}:7000", new: "advertise: ${NODE_IP}:7000", want: "${NODE_IP}, which the container's env does not set"},
		{name: "another identity", file: sidecar, old: "?role=web", new: "?role=api", want: "do not name this instance, tcpproxy://instance/web-0?role=web"},
		{name: "plaintext", file: sidecar, old: "    tls:\n      cert: /var/run/tcpproxy/tls/tls.crt\n      key: /var/run/tcpproxy/tls/tls.key\n      ca: /var/run/tcpproxy/tls/ca.crt\n    members:", new: "    members:", want: "sessions between proxies would run without TLS"},
		{name: "probe on the node", file: sidecar, old: "readinessProbe:\n            exec: {command: [tcpproxy, status, -check, -admin, \"127.0.0.1:9090\"]}",
			new: "readinessProbe:\n            httpGet: {path: /readyz, port: 9090, host: 127.0.0.1}", want: "asks the node, not the pod"},
		{name: "probe elsewhere", file: sidecar, old: "status, -live, -admin, \"127.0.0.1:9090\"", new: "status, -live, -admin, \"127.0.0.1:9091\"", want: "livenessProbe asks 127.0.0.1:9091"},
		{name: "unknown issuer", file: sidecar, old: "issuer-name: tcpproxy-ca", new: "issuer-name: mesh-ca", want: `issuer "mesh-ca" is not in the manifests`},
		{name: "not a manifest", file: "../../deploy/kubernetes/notes.txt", want: "not a YAML manifest"},

		// SPIFFE from SPIRE's Workload API.
		{name: "SVID of another role", file: spire, old: "role: kv\n    listen", new: "role: cache\n    listen",
			want: "SPIRE would issue spiffe://example.org/ns/default/sa/kv/pod/kv-0 (ClusterSPIFFEID tcpproxy-kv), which names instance kv-0 (role kv), not this instance, instance kv-0 (role cache)"},
		{name: "ID template SPIRE does not follow", file: spire, old: "idTemplate: /ns/${POD_NAMESPACE}/sa/{role}/pod/{iid}", new: "idTemplate: /ns/${POD_NAMESPACE}/pod/{iid}/sa/{role}",
			want: "SPIRE would issue spiffe://example.org/ns/default/sa/kv/pod/kv-0 (ClusterSPIFFEID tcpproxy-kv): SPIFFE ID spiffe://example.org/ns/default/sa/kv/pod/kv-0 does not match the ID template"},
		{name: "no registration for the pod", file: spire, old: "podSelector: {matchLabels: {app: kv}}", new: "podSelector: {matchLabels: {app: cache}}",
			want: "no ClusterSPIFFEID in the manifests selects this pod"},
		{name: "socket not mounted", file: spire, old: "            - {name: spiffe-workload-api, mountPath: /spiffe-workload-api, readOnly: true}\n", new: "",
			want: "tls.spiffe.socket /spiffe-workload-api/spire-agent.sock is in no volume the container mounts"},
		{name: "socket from an emptyDir", file: spire, old: "csi: {driver: csi.spiffe.io, readOnly: true}", new: "emptyDir: {}",
			want: "volume spiffe-workload-api is neither the SPIFFE CSI driver's"},
		{name: "ServiceAccount missing", file: spire, old: "serviceAccountName: kv", new: "serviceAccountName: kv-proxy",
			want: "serviceAccountName kv-proxy is not a ServiceAccount in the manifests"},

		// Prometheus and the metrics listener.
		{name: "metrics on loopback", file: sidecar, old: "metrics: 0.0.0.0:9100", new: "metrics: 127.0.0.1:9100", want: "is on the loopback interface: only this pod reaches it"},
		{name: "scrape the wrong port", file: sidecar, old: `prometheus.io/port: "9100"`, new: `prometheus.io/port: "9090"`, want: `prometheus.io/port "9090" is not the metrics port 9100`},
		{name: "metrics port not declared", file: spire, old: "            - {name: metrics, containerPort: 9100}\n", new: "", want: "metrics port 9100 is not among the container's ports"},
		{name: "scrape without metrics", file: sidecar, old: "    metrics: 0.0.0.0:9100", new: "", want: "prometheus.io/scrape is \"true\" but no tcpproxy container sets metrics:"},
		{name: "metrics not annotated", file: spire, old: `prometheus.io/scrape: "true"`, new: `prometheus.io/scrape: "false"`, want: "lacks the annotation prometheus.io/scrape"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			changed := map[string][]byte{}
			for k, v := range files {
				changed[k] = v
			}
			if tc.old == "" {
				changed[tc.file] = []byte("text")
			} else {
				text := string(files[tc.file])
				for _, r := range append([][2]string{{tc.old, tc.new}}, tc.more...) {
					require.Contains(t, text, r[0])
					text = strings.Replace(text, r[0], r[1], 1)
				}
				changed[tc.file] = []byte(text)
			}
			m, errs := decodeManifests(changed)
			if len(errs) == 0 {
				errs = m.check()
			}
			require.NotEmpty(t, errs)
			assert.Contains(t, errors.Join(errs...).Error(), tc.want)
		})
	}
}
