package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
// variables it expands are set, the files it names are mounted, the
// certificate names the instance, and the probes ask the admin endpoint
// from inside the pod. (Kubernetes' packages are used by this test only.)

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

// certManagerUsages are cert-manager's key usages (KeyUsage).
var certManagerUsages = []string{
	"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
	"data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
	"server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
	"ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}

// manifests is what the files hold, by kind.
type manifests struct {
	configMaps   map[string]*corev1.ConfigMap
	pods         map[string]*corev1.PodTemplateSpec // by "Kind/name"
	issuers      map[string]*certManagerIssuer
	certificates map[string]*certManagerCertificate
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
		configMaps: map[string]*corev1.ConfigMap{}, pods: map[string]*corev1.PodTemplateSpec{},
		issuers: map[string]*certManagerIssuer{}, certificates: map[string]*certManagerCertificate{},
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
	obj, _, err := k8sDecoder.Decode(doc, nil, nil)
	if err != nil {
		return err
	}
	switch o := obj.(type) {
	case *corev1.ConfigMap:
		m.configMaps[o.Name] = o
	case *appsv1.Deployment:
		m.pods["Deployment/"+o.Name] = &o.Spec.Template
	case *appsv1.StatefulSet:
		m.pods["StatefulSet/"+o.Name] = &o.Spec.Template
	case *appsv1.DaemonSet:
		m.pods["DaemonSet/"+o.Name] = &o.Spec.Template
	}
	return nil
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
		// certificate for this very instance.
		if cfg.TLS.Cert == "" {
			bad("container %s: %s: no tls: sessions would run in plaintext", c.Name, cfgPath)
		}
		files := []string{cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA}
		if e := cfg.Members.Etcd; e != nil {
			files = append(files, e.TLS.Cert, e.TLS.Key, e.TLS.CA)
		}
		for _, f := range files {
			if f == "" {
				continue
			}
			mt := mountOf(c, f)
			if mt == nil {
				bad("container %s: %s names %s, which no volume mounts", c.Name, cfgPath, f)
				continue
			}
			errs = append(errs, m.checkCertVolume(name, c.Name, volumes[mt.Name], cfg, env)...)
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
	return errs
}

// checkCertVolume checks that v holds a certificate of cfg's instance:
// cert-manager's csi-driver with that identity and both TLS usages, or a
// Secret that a cert-manager Certificate makes.
func (m *manifests) checkCertVolume(pod, container string, v corev1.Volume, cfg *fileConfig, env map[string]string) []error {
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
		uris, _ := expandSample(attr["csi.cert-manager.io/uri-sans"], map[string]string{"POD_NAME": env["HOSTNAME"]})
		want := pki.Identity{IID: cfg.IID, Role: cfg.Role}.URI().String()
		if !slices.Contains(strings.Split(uris, ","), want) {
			bad("uri-sans %q do not name this instance, %s", attr["csi.cert-manager.io/uri-sans"], want)
		}
		usages := strings.Split(attr["csi.cert-manager.io/key-usages"], ",")
		for _, u := range []string{"server auth", "client auth"} {
			if !slices.Contains(usages, u) {
				bad("key-usages lack %q, which mutual TLS needs", u)
			}
		}
	case v.Secret != nil:
		if !slices.ContainsFunc(slices.Collect(maps.Values(m.certificates)), func(c *certManagerCertificate) bool {
			return c.Spec.SecretName == v.Secret.SecretName
		}) {
			bad("Secret %s is made by no Certificate in the manifests", v.Secret.SecretName)
		}
	default:
		bad("holds TLS files but is neither cert-manager's csi-driver nor a Secret")
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
	assert.Len(t, m.configMaps, 2)
	assert.Contains(t, m.issuers, "tcpproxy-ca")
}

// TestKubernetesManifestChecks: the checks catch what rots: an unknown
// field (in Kubernetes' and cert-manager's resources), a configuration
// that tcpproxy refuses, a variable the pod does not set, a certificate
// for another identity, an httpGet probe on 127.0.0.1, plaintext.
func TestKubernetesManifestChecks(t *testing.T) {
	files := readManifests(t)
	sidecar := filepath.Join(manifestsDir, "sidecar-loopback.yaml")
	certs := filepath.Join(manifestsDir, "cert-manager.yaml")
	require.Contains(t, files, sidecar)
	require.Contains(t, files, certs)
	for _, tc := range []struct {
		name, file, old, new, want string
	}{
		{"unknown field", sidecar, "replicas: 3", "replica: 3", `unknown field "spec.replica"`},
		{"unknown cert-manager field", certs, "isCA: true", "isCa: true", `unknown field "spec.isCa"`},
		{"config tcpproxy refuses", sidecar, "ttl: 10s", "ttl: 10 seconds", `members.etcd.ttl (line 13): "10 seconds" is not a duration`},
		{"unknown config key", sidecar, "drainTimeout: 10s", "drainTimeOut: 10s", "drainTimeOut"},
		{"variable not set", sidecar, "advertise: ${POD_IP}:7000", "advertise: ${NODE_IP}:7000", "${NODE_IP}, which the container's env does not set"},
		{"another identity", sidecar, "?role=web", "?role=api", "do not name this instance, tcpproxy://instance/web-0?role=web"},
		{"plaintext", sidecar, "    tls:\n      cert: /var/run/tcpproxy/tls/tls.crt\n      key: /var/run/tcpproxy/tls/tls.key\n      ca: /var/run/tcpproxy/tls/ca.crt\n    members:", "    members:", "sessions would run in plaintext"},
		{"probe on the node", sidecar, "readinessProbe:\n            exec: {command: [tcpproxy, status, -check, -admin, \"127.0.0.1:9090\"]}",
			"readinessProbe:\n            httpGet: {path: /readyz, port: 9090, host: 127.0.0.1}", "asks the node, not the pod"},
		{"probe elsewhere", sidecar, "status, -live, -admin, \"127.0.0.1:9090\"", "status, -live, -admin, \"127.0.0.1:9091\"", "livenessProbe asks 127.0.0.1:9091"},
		{"unknown issuer", sidecar, "issuer-name: tcpproxy-ca", "issuer-name: mesh-ca", `issuer "mesh-ca" is not in the manifests`},
		{"not a manifest", "../../deploy/kubernetes/notes.txt", "", "", "not a YAML manifest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			changed := map[string][]byte{}
			for k, v := range files {
				changed[k] = v
			}
			if tc.old == "" {
				changed[tc.file] = []byte("text")
			} else {
				require.Contains(t, string(files[tc.file]), tc.old)
				changed[tc.file] = []byte(strings.Replace(string(files[tc.file]), tc.old, tc.new, 1))
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
