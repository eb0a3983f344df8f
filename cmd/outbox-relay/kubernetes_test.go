package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

const k8sDir = "../../deploy/kubernetes"

// The parts of the Kubernetes objects in deploy/kubernetes that the checks read.
type (
	k8sObject struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string
		Metadata   struct {
			Name   string
			Labels map[string]string
		}
		Spec k8sSpec
	}
	k8sSpec struct {
		Replicas *int
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		}
		MaxUnavailable *int `yaml:"maxUnavailable"`
		Template       struct {
			Metadata struct {
				Labels      map[string]string
				Annotations map[string]string
			}
			Spec k8sPodSpec
		}
		PodMetricsEndpoints []struct{ Port, Path string } `yaml:"podMetricsEndpoints"`
	}
	k8sPodSpec struct {
		TerminationGracePeriodSeconds int `yaml:"terminationGracePeriodSeconds"`
		SecurityContext               struct {
			RunAsNonRoot bool   `yaml:"runAsNonRoot"`
			RunAsGroup   *int64 `yaml:"runAsGroup"`
			FSGroup      *int64 `yaml:"fsGroup"`
		} `yaml:"securityContext"`
		Containers []k8sContainer
		Volumes    []struct {
			Name   string
			Secret *struct {
				SecretName  string `yaml:"secretName"`
				DefaultMode *int   `yaml:"defaultMode"`
				Items       []k8sKeyPath
			}
			ConfigMap *struct {
				Name  string
				Items []k8sKeyPath
			} `yaml:"configMap"`
		}
	}
	k8sKeyPath   struct{ Key, Path string }
	k8sContainer struct {
		Name, Image string
		Args        []string
		Env         []struct {
			Name, Value string
			ValueFrom   any `yaml:"valueFrom"`
		}
		Ports []struct {
			Name          string
			ContainerPort int `yaml:"containerPort"`
		}
		LivenessProbe  *k8sProbe `yaml:"livenessProbe"`
		ReadinessProbe *k8sProbe `yaml:"readinessProbe"`
		Resources      struct{ Requests, Limits map[string]string }
		VolumeMounts   []struct {
			Name      string
			MountPath string `yaml:"mountPath"`
		} `yaml:"volumeMounts"`
	}
	k8sProbe struct {
		HTTPGet *struct {
			Path string
			Port yaml.Node
		} `yaml:"httpGet"`
	}
)

// loadK8s parses every YAML document of deploy/kubernetes, by kind (one object of each).
func loadK8s(t *testing.T) (objs map[string]k8sObject, kustomization map[string]any) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	objs = map[string]k8sObject{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		if filepath.Base(f) == "kustomization.yaml" {
			require.NoError(t, yaml.Unmarshal(b, &kustomization), f)
			continue
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var o k8sObject
			err := dec.Decode(&o)
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err, f)
			require.NotEmpty(t, o.APIVersion, f)
			require.NotEmpty(t, o.Metadata.Name, f)
			require.NotContains(t, objs, o.Kind, "%s: a second %s", f, o.Kind)
			objs[o.Kind] = o
		}
	}
	return objs, kustomization
}

// runFlagNames lists the flags of outbox-relay run, from its --help.
func runFlagNames(t *testing.T) map[string]bool {
	t.Helper()
	var out bytes.Buffer
	require.ErrorIs(t, dispatch(context.Background(), []string{"run", "--help"}, &out, &out, noEnv), flag.ErrHelp)
	names := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(out.String(), -1) {
		names[m[1]] = true
	}
	require.Contains(t, names, "standby")
	return names
}

// k8sQuantity parses a Kubernetes memory or CPU quantity (Ki/Mi/Gi, m, or plain).
func k8sQuantity(t *testing.T, q string) float64 {
	t.Helper()
	for suffix, mult := range map[string]float64{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "m": 0.001} {
		if n, ok := strings.CutSuffix(q, suffix); ok {
			v, err := strconv.ParseFloat(n, 64)
			require.NoError(t, err, q)
			return v * mult
		}
	}
	v, err := strconv.ParseFloat(q, 64)
	require.NoError(t, err, q)
	return v
}

// The Kubernetes manifests in deploy/kubernetes, checked without a cluster: they parse; the
// container's arguments are flags of outbox-relay run that parse (Kubernetes' $(VAR)
// expansion applied); the relay and its --standby peer; probes and scrape targets at the port
// --http-addr binds and at paths the relay's own HTTP server answers as the probes need; every
// secret or CA file a flag or PGPASSFILE names is a key of a mounted volume, readable by the
// non-root user and passing the relay's own secret-file check; resources present and sized
// from the benchmark's RSS; the budget and the monitor select the pods.
func TestKubernetesManifests(t *testing.T) {
	objs, kust := loadK8s(t)
	for _, kind := range []string{"Deployment", "PodDisruptionBudget", "PodMonitor"} {
		require.Contains(t, objs, kind)
	}
	dep := objs["Deployment"]
	pod := dep.Spec.Template.Spec
	labels := dep.Spec.Template.Metadata.Labels
	require.Equal(t, dep.Spec.Selector.MatchLabels, labels)
	require.Len(t, pod.Containers, 1)
	c := pod.Containers[0]

	// kustomization: its resources exist, and its image entry is the container's image.
	for _, r := range kust["resources"].([]any) {
		require.FileExists(t, filepath.Join(k8sDir, r.(string)))
	}
	image := strings.SplitN(c.Image, ":", 2)[0]
	require.Equal(t, image, kust["images"].([]any)[0].(map[string]any)["name"])

	// Arguments: run, then flags only (so parsing reaches the final --help), each one the
	// relay has, with values that parse.
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if e.Name == "POD_IP" {
			env[e.Name] = "127.0.0.1"
		}
	}
	expand := func(s string) string {
		return regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).ReplaceAllStringFunc(s, func(m string) string {
			v, ok := env[m[2:len(m)-1]]
			require.True(t, ok, "%s: %s is not in the container's env (Kubernetes leaves it unexpanded)", s, m)
			return v
		})
	}
	require.Equal(t, "run", c.Args[0])
	names := runFlagNames(t)
	flags := map[string]string{}
	args := []string{"run"}
	for _, a := range c.Args[1:] {
		a = expand(a)
		require.True(t, strings.HasPrefix(a, "--"), "%q is not a --flag", a)
		name, value, _ := strings.Cut(a[2:], "=")
		require.True(t, names[name], "--%s is not a flag of outbox-relay run", name)
		flags[name] = value
		args = append(args, a)
	}
	for name := range env {
		if f, ok := strings.CutPrefix(name, "OUTBOX_RELAY_"); ok {
			require.True(t, names[strings.ReplaceAll(strings.ToLower(f), "_", "-")], "env %s names no flag", name)
		}
	}
	var out bytes.Buffer
	err := dispatch(context.Background(), append(args, "--help"), &out, &out, noEnv)
	require.ErrorIs(t, err, flag.ErrHelp, out.String())

	// The relay and its standby: every pod may take the slot over; none creates one.
	require.GreaterOrEqual(t, *dep.Spec.Replicas, 2)
	require.Contains(t, flags, "standby")
	require.NotContains(t, flags, "temporary-slot")
	drain := 10 * time.Second // --drain-timeout's default
	if v, ok := flags["drain-timeout"]; ok {
		drain, err = time.ParseDuration(v)
		require.NoError(t, err)
	}
	require.Greater(t, time.Duration(pod.TerminationGracePeriodSeconds)*time.Second, drain+5*time.Second, "SIGTERM leaves the relay --drain-timeout and its final status update")

	// Ports: --http-addr binds the pod IP at the metrics port; probes, annotations and the
	// monitor use it.
	host, port, err := net.SplitHostPort(flags["http-addr"])
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1", host, "--http-addr binds $(POD_IP)")
	require.Equal(t, defaultHTTPPort, port)
	require.Len(t, c.Ports, 1)
	require.Equal(t, port, strconv.Itoa(c.Ports[0].ContainerPort))
	portName := c.Ports[0].Name
	ann := dep.Spec.Template.Metadata.Annotations
	require.Equal(t, port, ann["prometheus.io/port"])
	require.Equal(t, "/metrics", ann["prometheus.io/path"])
	pm := objs["PodMonitor"]
	require.Equal(t, labels, pm.Spec.Selector.MatchLabels)
	require.Len(t, pm.Spec.PodMetricsEndpoints, 1)
	require.Equal(t, portName, pm.Spec.PodMetricsEndpoints[0].Port)
	require.Equal(t, "/metrics", pm.Spec.PodMetricsEndpoints[0].Path)
	for _, p := range []*k8sProbe{c.LivenessProbe, c.ReadinessProbe} {
		require.NotNil(t, p)
		require.NotNil(t, p.HTTPGet)
		require.Contains(t, []string{portName, port}, p.HTTPGet.Port.Value)
	}

	// Probe paths, against the relay's HTTP server: liveness answers while the process runs;
	// readiness answers ready for a relay standing by (connected to NATS), where plain /readyz
	// does not, and not ready for one neither relaying nor standing by.
	o := newObserver(sink.DefaultStream, zerolog.Nop())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer o.serveHTTP(ln)()
	base := "http://" + ln.Addr().String()
	code, _ := get(t, base+c.LivenessProbe.HTTPGet.Path)
	require.Equal(t, http.StatusOK, code)
	code, body := get(t, base+"/metrics")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "outbox_relay_")
	o.nc.Store(natsembed.JetStream(t).Connect(t))
	code, _ = get(t, base+c.ReadinessProbe.HTTPGet.Path)
	require.Equal(t, http.StatusServiceUnavailable, code, "not relaying, not standing by")
	o.standingBy.Store(true)
	code, body = get(t, base+c.ReadinessProbe.HTTPGet.Path)
	require.Equal(t, http.StatusOK, code, body)
	code, _ = get(t, base+"/readyz")
	require.Equal(t, http.StatusServiceUnavailable, code)

	// Files: every file a flag, the Postgres URL or PGPASSFILE names is a key of a volume
	// mounted at its directory.
	mounted := map[string]string{} // file path -> volume name
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	secretVolume := map[string]bool{}
	for _, v := range pod.Volumes {
		var items []k8sKeyPath
		switch {
		case v.Secret != nil:
			items = v.Secret.Items
			secretVolume[v.Name] = true
			// Readable by the pod's fsGroup, never by others.
			require.NotNil(t, v.Secret.DefaultMode, v.Name)
			require.Equal(t, 0o040, *v.Secret.DefaultMode&0o044, "%s: defaultMode %04o", v.Name, *v.Secret.DefaultMode)
		case v.ConfigMap != nil:
			items = v.ConfigMap.Items
		}
		require.NotEmpty(t, items, "%s: list its keys (items), so the paths are known", v.Name)
		require.Contains(t, mounts, v.Name, "volume %s is not mounted", v.Name)
		for _, it := range items {
			mounted[path.Join(mounts[v.Name], it.Path)] = v.Name
		}
	}
	pgURL, err := url.Parse(flags["pg-url"])
	require.NoError(t, err)
	files := map[string]string{"PGPASSFILE": env["PGPASSFILE"]}
	for _, k := range []string{"sslrootcert", "sslcert", "sslkey", "passfile"} {
		if v := pgURL.Query().Get(k); v != "" {
			files["--pg-url "+k] = v
		}
	}
	for _, f := range []string{"config", "nats-password-file", "nats-token-file", "nats-creds", "nats-nkey", "nats-tls-ca", "nats-tls-cert", "nats-tls-key"} {
		if v, ok := flags[f]; ok {
			files["--"+f] = v
		}
	}
	require.NotEmpty(t, files["PGPASSFILE"])
	if u := pgURL.User; u != nil {
		_, hasPW := u.Password()
		require.False(t, hasPW, "the Postgres password belongs in the pgpass file")
	}
	for what, p := range files {
		require.Contains(t, mounted, p, "%s %s is not a key of a mounted volume", what, p)
	}
	for _, secret := range []string{"PGPASSFILE", "--nats-password-file"} {
		require.True(t, secretVolume[mounted[files[secret]]], "%s is in a secret volume", secret)
	}
	// The relay runs as the image's non-root user; secret files reach it through fsGroup.
	sc := pod.SecurityContext
	require.True(t, sc.RunAsNonRoot)
	require.NotNil(t, sc.FSGroup)
	require.NotNil(t, sc.RunAsGroup)
	require.Equal(t, *sc.RunAsGroup, *sc.FSGroup)

	// Resources, from make bench: peak RSS about 36-50 MiB with small events, and 4-5 x the
	// bytes in flight with a window full of large ones (bench/README.md, Large events).
	inFlight := float64(sink.DefaultMaxInFlightBytes)
	if v, ok := flags["max-in-flight-bytes"]; ok {
		inFlight = k8sQuantity(t, v)
	}
	for _, k := range []string{"cpu", "memory"} {
		require.Contains(t, c.Resources.Requests, k)
	}
	require.NotContains(t, c.Resources.Limits, "cpu", "a CPU limit throttles the drain")
	require.GreaterOrEqual(t, k8sQuantity(t, c.Resources.Requests["memory"]), 50.0*(1<<20))
	limit := k8sQuantity(t, c.Resources.Limits["memory"])
	require.GreaterOrEqual(t, limit, 5*inFlight, "memory limit under 5 x --max-in-flight-bytes")
	require.Less(t, k8sQuantity(t, strings.TrimSuffix(env["GOMEMLIMIT"], "B")), limit, "GOMEMLIMIT under the container's limit")

	// The budget selects the pods and lets one go at a time.
	pdb := objs["PodDisruptionBudget"]
	require.Equal(t, labels, pdb.Spec.Selector.MatchLabels)
	require.NotNil(t, pdb.Spec.MaxUnavailable)
	require.Equal(t, 1, *pdb.Spec.MaxUnavailable)
}
