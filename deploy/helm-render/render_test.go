package main

// The chart render test: renders deploy/helm/kvrecall with its default values and with
// non-default value files, parses every document, and checks the invariants that a typo in a
// template or a value would break without any error from Kubernetes (a Service port that does
// not reach the server, a probe on the wrong port, peers that are not the pods' names, a flag
// the binary does not have). checkRelease returns every problem it finds; the Mutation tests
// prove that it does find them.

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const chartDir = "../helm/kvrecall"

var repoRoot = filepath.Join("..", "..")

// scenario is one `helm template` invocation.
type scenario struct {
	name      string
	files     []string // value files over values.yaml, in order
	release   string
	namespace string
}

var scenarios = []scenario{
	// The defaults plus only what the chart requires.
	{"defaults", []string{"testdata/required.yaml"}, "kvrecall", "default"},
	// Durable nodes, three of them, sequences on two, hugepages, ServiceMonitor on.
	{"durable-3-monitor", []string{"testdata/required.yaml", "testdata/durable-3-monitor.yaml"}, "prod", "llm"},
	// RDMA with host networking, UCX settings, TLS + tenant tokens, static discovery, 8 GPUs.
	{"rdma-hostnet-tls", []string{"testdata/required.yaml", "testdata/rdma-hostnet-tls.yaml"}, "edge", "serving"},
	// One node, no claim, no metrics port, no workers.
	{"ephemeral-no-worker", []string{"testdata/required.yaml", "testdata/ephemeral-no-worker.yaml"}, "cache", "default"},
}

// release is a rendered scenario: the merged values and the parsed documents.
type release struct {
	sc     scenario
	values map[string]interface{}
	out    *Rendered
	docs   []doc
}

type doc struct {
	source string
	text   string
	obj    map[string]interface{}
}

func render(t *testing.T, sc scenario, extra map[string]interface{}) (*release, error) {
	t.Helper()
	chart, err := LoadChart(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	values := chart.Values
	for _, f := range sc.files {
		v, err := ReadValues(f)
		if err != nil {
			t.Fatalf("%v", err)
		}
		values = MergeValues(values, v)
	}
	if extra != nil {
		values = MergeValues(values, extra)
	}
	out, err := Render(chart, values, ReleaseOptions{Name: sc.release, Namespace: sc.namespace})
	if err != nil {
		return nil, err
	}
	r := &release{sc: sc, values: values, out: out}
	for _, m := range out.Manifests() {
		var obj map[string]interface{}
		if err := yaml.Unmarshal([]byte(m.Text), &obj); err != nil {
			t.Fatalf("%s: %s does not parse as YAML: %v\n%s", sc.name, m.Source, err, m.Text)
		}
		r.docs = append(r.docs, doc{source: m.Source, text: m.Text, obj: obj})
	}
	return r, nil
}

func mustRender(t *testing.T, sc scenario, extra map[string]interface{}) *release {
	t.Helper()
	r, err := render(t, sc, extra)
	if err != nil {
		t.Fatalf("%s: render failed: %v", sc.name, err)
	}
	return r
}

func TestScenariosRenderAndHoldInvariants(t *testing.T) {
	for _, sc := range scenarios {
		sc := sc
		t.Run(sc.name, func(t *testing.T) {
			r := mustRender(t, sc, nil)
			for _, p := range checkRelease(r) {
				t.Error(p)
			}
			if t.Failed() {
				t.Logf("rendered manifests:\n%s", dump(r))
			}
		})
	}
}

// The scenarios must differ where they are meant to, or they test less than they claim.
func TestScenariosCoverWhatTheyName(t *testing.T) {
	d := mustRender(t, scenarios[0], nil)
	m := mustRender(t, scenarios[1], nil)
	x := mustRender(t, scenarios[2], nil)
	if d.find("ServiceMonitor", "") != nil || m.find("ServiceMonitor", "") == nil {
		t.Error("ServiceMonitor must be off by default and on in durable-3-monitor")
	}
	if flagsOf(serverContainer(m))["durable"] == nil || flagsOf(serverContainer(d))["durable"] != nil {
		t.Error("--durable must be off by default and on in durable-3-monitor")
	}
	if got := intAt(m.sts().obj, "spec", "replicas"); got != 3 {
		t.Errorf("durable-3-monitor: %d tier replicas, want 3", got)
	}
	if get(x.sts().obj, "spec", "template", "spec", "hostNetwork") != true {
		t.Error("rdma-hostnet-tls: tier pods are not on the host network")
	}
	if flagsOf(serverContainer(x))["tls_cert"] == nil || flagsOf(serverContainer(d))["tls_cert"] != nil {
		t.Error("--tls-cert must be rendered only with tls.enabled")
	}
	if !strings.HasPrefix(str(flagsOf(workerContainer(d))["tier"]), "dns:///") ||
		strings.HasPrefix(str(flagsOf(workerContainer(x))["tier"]), "dns:///") {
		t.Error("defaults must discover the tier by DNS, rdma-hostnet-tls by the static list")
	}
}

// Required values fail with a message that names them, as `helm install` would print it.
func TestRequiredValuesFailClearly(t *testing.T) {
	base := scenario{"required", nil, "kvrecall", "default"}
	withRequired := scenario{"required", []string{"testdata/required.yaml"}, "kvrecall", "default"}
	cases := []struct {
		name  string
		sc    scenario
		extra map[string]interface{}
		want  string
	}{
		{"no values at all", base, nil, "image.server.repository is required"},
		{"no server image", withRequired, m("image", m("server", m("repository", ""))), "image.server.repository is required"},
		{"no worker image", withRequired, m("image", m("worker", m("repository", ""))), "image.worker.repository is required"},
		{"no model path", withRequired, m("worker", m("model", m("path", ""))), "worker.model.path is required"},
		{"durable without a claim", withRequired,
			m("tier", m("persistence", m("enabled", false, "durable", true))), "tier.persistence.durable needs tier.persistence.enabled"},
		{"replication above the nodes", withRequired, m("worker", m("replication", 3)), "worker.replication (3) cannot exceed tier.replicas (2)"},
		{"tls without a secret", withRequired, m("tls", m("enabled", true)), "tls.secretName is required"},
		{"tokens without a secret", withRequired, m("auth", m("enabled", true)), "auth.secretName is required"},
		{"tokens without the worker's", withRequired, m("auth", m("enabled", true, "secretName", "t")), "auth.workerSecretName is required"},
		{"monitor without metrics", withRequired,
			m("tier", m("metrics", m("enabled", false), "serviceMonitor", m("enabled", true), "probes", m("liveness", m("mode", "tcp")))),
			"tier.serviceMonitor.enabled needs tier.metrics.enabled"},
		{"http liveness without metrics", withRequired, m("tier", m("metrics", m("enabled", false))), "tier.probes.liveness.mode=http needs tier.metrics.enabled"},
		{"unknown method", withRequired, m("retrieval", m("method", "magic")), `retrieval.method must be exact, ctkvr or cluster, not "magic"`},
		{"ucx workers without ucx on the tier", withRequired, m("tier", m("transport", "none")), "set worker.transport=grpc"},
		{"unknown discovery", withRequired, m("worker", m("tierDiscovery", "mdns")), `worker.tierDiscovery must be dns or static, not "mdns"`},
	}
	for _, c := range cases {
		_, err := render(t, c.sc, c.extra)
		if err == nil {
			t.Errorf("%s: rendered, want an error containing %q", c.name, c.want)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q does not contain %q", c.name, err, c.want)
		}
		if !strings.HasPrefix(err.Error(), "execution error at (kvrecall/templates/") {
			t.Errorf("%s: error %q does not name the template (Helm's format)", c.name, err)
		}
	}
	// The worker's values are not required when there are no workers.
	if _, err := render(t, withRequired, m("worker", m("enabled", false, "model", m("path", "")), "image", m("worker", m("repository", "")))); err != nil {
		t.Errorf("worker.enabled=false still requires worker values: %v", err)
	}
}

// The invariant checks find what they are meant to find: break one thing in a good render and
// expect the problem. Without this, a check that can never fail would pass silently.
func TestInvariantChecksCatchBrokenRenders(t *testing.T) {
	mutations := []struct {
		name   string
		mutate func(r *release)
		want   string
	}{
		{"headless port differs from --listen", func(r *release) {
			setAt(r.find("Service", "headless").obj, 7171, "spec", "ports", 0, "port")
		}, "headless Service port grpc = 7171"},
		{"readiness probe on another port", func(r *release) {
			setAt(serverContainer(r), 7171, "readinessProbe", "grpc", "port")
		}, "readinessProbe gRPC port 7171"},
		{"peers missing a pod", func(r *release) {
			setFlag(serverContainer(r), "peers", "kvrecall-tier-0.kvrecall-tier-headless.default.svc.cluster.local:7070")
		}, "--peers"},
		{"worker tier names another service", func(r *release) {
			setFlag(workerContainer(r), "tier", "dns:///other.default.svc.cluster.local:7070")
		}, "worker --tier"},
		{"unknown server flag", func(r *release) {
			c := serverContainer(r)
			c["args"] = append(c["args"].([]interface{}), "--no-such-flag=1")
		}, "server flag --no-such-flag"},
		{"dashed name in a flag file", func(r *release) {
			data := r.find("ConfigMap", "").obj["data"].(map[string]interface{})
			data["worker.flags"] = strings.Replace(str(data["worker.flags"]), "--sink_tokens", "--sink-tokens", 1)
		}, "worker.flags: --sink-tokens"},
		{"dense layers disagree with the auto index", func(r *release) {
			data := r.find("ConfigMap", "").obj["data"].(map[string]interface{})
			data["tier.flags"] = strings.Replace(str(data["tier.flags"]), "--auto_index_first_layer=2", "--auto_index_first_layer=3", 1)
		}, "auto_index_first_layer"},
		{"memory above the limit", func(r *release) {
			setFlag(serverContainer(r), "memory", "64GiB")
		}, "--memory=64GiB"},
		{"selector misses the pods", func(r *release) {
			setAt(r.find("Service", "client").obj, "worker", "spec", "selector", "app.kubernetes.io/component")
		}, "selects no tier pod"},
	}
	for _, mu := range mutations {
		r := mustRender(t, scenarios[0], nil)
		if p := checkRelease(r); len(p) != 0 {
			t.Fatalf("the unmutated render has problems: %v", p)
		}
		mu.mutate(r)
		found := false
		for _, p := range checkRelease(r) {
			found = found || strings.Contains(p, mu.want)
		}
		if !found {
			t.Errorf("%s: no problem mentioning %q in %v", mu.name, mu.want, checkRelease(r))
		}
	}
}

// Every value in values.yaml has a "# --" comment and a row in the chart's README.
func TestEveryValueIsDocumented(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var root yaml.Node
	if err := yaml.Unmarshal(raw, &root); err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(chartDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	var walk func(n *yaml.Node, prefix string)
	walk = func(n *yaml.Node, prefix string) {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := strings.TrimPrefix(prefix+"."+k.Value, ".")
			if regexp.MustCompile(`(?m)^# -- `).MatchString(k.HeadComment) {
				paths = append(paths, p)
				continue
			}
			if v.Kind != yaml.MappingNode || len(v.Content) == 0 {
				t.Errorf("values.yaml: %s has no \"# --\" comment", p)
				continue
			}
			walk(v, p)
		}
	}
	walk(root.Content[0], "")
	for _, p := range paths {
		if !strings.Contains(string(readme), "`"+p+"`") {
			t.Errorf("chart README.md does not document `%s`", p)
		}
	}
	if len(paths) < 50 {
		t.Errorf("found only %d documented values; the walk is broken", len(paths))
	}
}

// ---------------------------------------------------------------------------------------------
// The invariants.

// binaryFlags are the ABSL_FLAG names of a source file, read at test time, so that a renamed or
// removed flag fails this test instead of a pod's start.
func binaryFlags(file string) (map[string]bool, error) {
	src, err := os.ReadFile(filepath.Join(repoRoot, file))
	if err != nil {
		return nil, err
	}
	names := map[string]bool{"flagfile": true} // absl's own
	for _, mm := range regexp.MustCompile(`ABSL_FLAG\(\s*[\w:<>]+\s*,\s*(\w+)\s*,`).FindAllStringSubmatch(string(src), -1) {
		names[mm[1]] = true
	}
	if len(names) < 10 {
		return nil, fmt.Errorf("%s: found only %d flags; the pattern no longer matches", file, len(names))
	}
	return names, nil
}

// workerSubcommands are the commands kvrecall-worker's main dispatches on (cmd == "...").
func workerSubcommands() (map[string]bool, error) {
	src, err := os.ReadFile(filepath.Join(repoRoot, "gpu-worker/worker_main.cc"))
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, mm := range regexp.MustCompile(`cmd == "([\w-]+)"`).FindAllStringSubmatch(string(src), -1) {
		out[mm[1]] = true
	}
	return out, nil
}

// Server flags the chart may render before the binary has them (value: the setting behind
// which); none now.
var pendingServerFlags = map[string]string{}

func checkRelease(r *release) []string {
	var p []string
	fail := func(format string, a ...interface{}) { p = append(p, fmt.Sprintf(format, a...)) }
	v := r.values
	ns := r.sc.namespace
	domain := str(get(v, "clusterDomain"))

	serverFlags, err := binaryFlags("kvstore/server_main.cc")
	if err != nil {
		return []string{err.Error()}
	}
	workerFlags, err := binaryFlags("gpu-worker/worker_main.cc")
	if err != nil {
		return []string{err.Error()}
	}

	// Every document is a named Kubernetes object in the release's namespace; names are unique
	// per kind and fit Kubernetes' limits.
	seen := map[string]bool{}
	for _, d := range r.docs {
		kind, name := str(d.obj["kind"]), str(get(d.obj, "metadata", "name"))
		if str(d.obj["apiVersion"]) == "" || kind == "" || name == "" {
			fail("%s: a document without apiVersion, kind or metadata.name", d.source)
		}
		if got := str(get(d.obj, "metadata", "namespace")); got != ns {
			fail("%s %s: namespace %q, want %q", kind, name, got, ns)
		}
		if len(name) > 63 {
			fail("%s %s: name longer than 63", kind, name)
		}
		if seen[kind+"/"+name] {
			fail("%s %s rendered twice", kind, name)
		}
		seen[kind+"/"+name] = true
	}

	sts, headless, client, cm := r.sts(), r.find("Service", "headless"), r.find("Service", "client"), r.find("ConfigMap", "")
	if sts == nil || headless == nil || client == nil || cm == nil {
		return append(p, "missing the tier StatefulSet, its headless or client Service, or the ConfigMap")
	}
	stsName := str(get(sts.obj, "metadata", "name"))
	hlName := str(get(headless.obj, "metadata", "name"))
	podLabels := mapOf(get(sts.obj, "spec", "template", "metadata", "labels"))

	// The StatefulSet is governed by the headless Service; its selector picks its own pods.
	if got := str(get(sts.obj, "spec", "serviceName")); got != hlName {
		fail("StatefulSet serviceName %q is not the headless Service %q", got, hlName)
	}
	if get(headless.obj, "spec", "clusterIP") != "None" {
		fail("Service %s is not headless (clusterIP: None)", hlName)
	}
	if got, want := get(headless.obj, "spec", "publishNotReadyAddresses"), get(v, "tier", "headless", "publishNotReadyAddresses"); got != want {
		fail("headless Service publishNotReadyAddresses %v, want %v", got, want)
	}
	if !subset(mapOf(get(sts.obj, "spec", "selector", "matchLabels")), podLabels) {
		fail("StatefulSet selector does not match its pod labels")
	}
	if got, want := intAt(sts.obj, "spec", "replicas"), toInt(get(v, "tier", "replicas")); got != want {
		fail("StatefulSet replicas %d, values tier.replicas %d", got, want)
	}
	for _, s := range []*doc{headless, client} {
		sel := mapOf(get(s.obj, "spec", "selector"))
		if len(sel) == 0 || !subset(sel, podLabels) {
			fail("Service %s selects no tier pod (selector %v)", get(s.obj, "metadata", "name"), sel)
		}
	}
	if pdb := r.find("PodDisruptionBudget", ""); pdb != nil {
		if !subset(mapOf(get(pdb.obj, "spec", "selector", "matchLabels")), podLabels) {
			fail("PodDisruptionBudget selects no tier pod")
		}
	} else if get(v, "tier", "pdb", "enabled") == true {
		fail("tier.pdb.enabled but no PodDisruptionBudget")
	}

	// Ports: --listen, the container port, both Services, the probes and --metrics-port agree.
	srv := serverContainer(r)
	if srv == nil {
		return append(p, "no server container")
	}
	sf := flagsOf(srv)
	grpcPort := toInt(get(v, "tier", "grpcPort"))
	listen := str(sf["listen"])
	if !strings.HasSuffix(listen, fmt.Sprintf(":%d", grpcPort)) {
		fail("--listen=%s does not end in tier.grpcPort %d", listen, grpcPort)
	}
	cports := namedPorts(srv["ports"], "containerPort")
	if cports["grpc"] != grpcPort {
		fail("server container port grpc = %d, --listen port %d", cports["grpc"], grpcPort)
	}
	metricsOn := get(v, "tier", "metrics", "enabled") == true
	if metricsOn {
		mp := toInt(get(v, "tier", "metrics", "port"))
		if str(sf["metrics_port"]) != strconv.Itoa(mp) || cports["metrics"] != mp {
			fail("--metrics-port=%v, container port metrics = %d, tier.metrics.port %d", sf["metrics_port"], cports["metrics"], mp)
		}
	} else if str(sf["metrics_port"]) != "-1" {
		fail("metrics disabled but --metrics-port=%v", sf["metrics_port"])
	}
	for _, s := range []*doc{headless, client} {
		name := str(get(s.obj, "metadata", "name"))
		kindOf := map[*doc]string{headless: "headless", client: "client"}[s]
		for _, sp := range listOf(get(s.obj, "spec", "ports")) {
			spm := mapOf(sp)
			pname, target := str(spm["name"]), spm["targetPort"]
			want, ok := cports[pname]
			if !ok {
				fail("Service %s port %s has no container port of that name", name, pname)
				continue
			}
			if toInt(spm["port"]) != want {
				fail("%s Service port %s = %d, container port %d", kindOf, pname, toInt(spm["port"]), want)
			}
			if target != pname && toInt(target) != want {
				fail("Service %s port %s targets %v, not the container port", name, pname, target)
			}
		}
		if namedPorts(get(s.obj, "spec", "ports"), "port")["grpc"] != grpcPort {
			fail("Service %s has no grpc port %d", name, grpcPort)
		}
	}
	tlsOn := get(v, "tls", "enabled") == true
	for _, probe := range []string{"startupProbe", "readinessProbe", "livenessProbe"} {
		pr := mapOf(srv[probe])
		if pr == nil {
			fail("server container has no %s", probe)
			continue
		}
		switch {
		case pr["grpc"] != nil:
			if tlsOn {
				fail("%s is a gRPC probe but kubelet's gRPC probe cannot speak TLS", probe)
			}
			if got := toInt(get(pr, "grpc", "port")); got != grpcPort {
				fail("%s gRPC port %d, --listen port %d", probe, got, grpcPort)
			}
			if s := get(pr, "grpc", "service"); s != nil && s != "" {
				fail("%s asks for gRPC health service %q; the server serves only \"\"", probe, s)
			}
		case pr["httpGet"] != nil:
			if str(get(pr, "httpGet", "path")) != "/healthz" || !metricsOn {
				fail("%s httpGet %v: the server answers only /healthz on the metrics port", probe, pr["httpGet"])
			}
			if port := get(pr, "httpGet", "port"); port != "metrics" && toInt(port) != cports["metrics"] {
				fail("%s httpGet port %v is not the metrics port", probe, port)
			}
		case pr["tcpSocket"] != nil:
			if port := get(pr, "tcpSocket", "port"); port != "grpc" && toInt(port) != grpcPort {
				fail("%s tcpSocket port %v is not the gRPC port", probe, port)
			}
		default:
			fail("%s has no handler", probe)
		}
		if probe == "readinessProbe" && !tlsOn && pr["grpc"] == nil {
			fail("readinessProbe must be the gRPC health check (a drained node turns NOT_SERVING)")
		}
	}
	if probe := mapOf(srv["livenessProbe"]); probe != nil && probe["grpc"] != nil && get(v, "tier", "probes", "liveness", "mode") != "grpc" {
		fail("livenessProbe is gRPC although tier.probes.liveness.mode is %v (a drained node would be restarted)", get(v, "tier", "probes", "liveness", "mode"))
	}

	// --peers is exactly the StatefulSet's pod DNS names; --advertise is this pod's among them.
	replicas := intAt(sts.obj, "spec", "replicas")
	var want []string
	for i := 0; i < replicas; i++ {
		want = append(want, fmt.Sprintf("%s-%d.%s.%s.svc.%s:%d", stsName, i, hlName, ns, domain, grpcPort))
	}
	podDNSNames := strings.Join(want, ",")
	if get(v, "tier", "placementCheck") == true {
		peers := strings.Split(str(sf["peers"]), ",")
		if strings.Join(peers, ",") != podDNSNames {
			fail("--peers=%s, want the StatefulSet's pod DNS names %s", sf["peers"], podDNSNames)
		}
		adv := str(sf["advertise"])
		if !hasPodNameEnv(srv) {
			fail("server container has no POD_NAME from metadata.name for --advertise")
		}
		for i := 0; i < replicas; i++ {
			self := strings.ReplaceAll(adv, "$(POD_NAME)", fmt.Sprintf("%s-%d", stsName, i))
			if !contains(peers, self) {
				fail("pod %s-%d would advertise %s, which is not in --peers (the server refuses to start)", stsName, i, self)
			}
		}
	} else if sf["peers"] != nil || sf["advertise"] != nil {
		fail("tier.placementCheck is off but --peers/--advertise are rendered")
	}

	// Flags exist in the binaries; flag files use absl's own names (underscores).
	checkFlags := func(who string, known map[string]bool, flags map[string]interface{}, pending map[string]string) {
		for name := range flags {
			if known[name] {
				continue
			}
			if gate, ok := pending[name]; ok && get(v, pathOf(gate)...) == true {
				continue // rendered only behind its value; needs kvrecall >= the release with issue 9
			}
			fail("%s flag --%s is not an ABSL_FLAG of the binary", who, strings.ReplaceAll(name, "_", "-"))
		}
	}
	checkFlags("server", serverFlags, sf, pendingServerFlags)
	data := mapOf(cm.obj["data"])
	flagFiles := map[string]map[string]string{}
	for key, known := range map[string]map[string]bool{"tier.flags": serverFlags, "worker.flags": workerFlags} {
		flagFiles[key] = map[string]string{}
		for _, line := range strings.Split(str(data[key]), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			name, val, _ := strings.Cut(strings.TrimPrefix(line, "--"), "=")
			if !strings.HasPrefix(line, "--") || !known[name] {
				fail("%s: %s is not an ABSL_FLAG of the binary (flag files take absl's names, with underscores)", key, line)
			}
			flagFiles[key][name] = val
		}
	}
	if sf["flagfile"] != "/etc/kvrecall/config/tier.flags" || !mountsConfig(sts.obj, srv, str(get(cm.obj, "metadata", "name"))) {
		fail("server does not read tier.flags from the mounted ConfigMap")
	}
	checksum := fmt.Sprintf("%x", sha256.Sum256([]byte(r.out.Files["kvrecall/templates/configmap.yaml"])))
	if got := get(sts.obj, "spec", "template", "metadata", "annotations", "checksum/config"); got != checksum {
		fail("tier pods' checksum/config %v is not the ConfigMap's %s (pods would not roll on a change)", got, checksum)
	}

	// Storage: --data-dir is the mounted claim; --durable only on a claim.
	dataDir := str(sf["data_dir"])
	if mountPathOf(srv, "data") != dataDir || dataDir == "" {
		fail("--data-dir=%s is not where volume data is mounted (%s)", dataDir, mountPathOf(srv, "data"))
	}
	hasClaim := false
	for _, c := range listOf(get(sts.obj, "spec", "volumeClaimTemplates")) {
		hasClaim = hasClaim || get(c, "metadata", "name") == "data"
	}
	if hasClaim != (get(v, "tier", "persistence", "enabled") == true) {
		fail("volumeClaimTemplates data present=%v, tier.persistence.enabled=%v", hasClaim, get(v, "tier", "persistence", "enabled"))
	}
	if sf["durable"] != nil && !hasClaim {
		fail("--durable without a PersistentVolumeClaim: nothing would survive the pod")
	}

	// Memory: the arena (--memory) fits in the hugepages, or else in the memory limit.
	mem, err := parseKvBytes(str(sf["memory"]))
	if err != nil {
		fail("--memory=%v: %v", sf["memory"], err)
	}
	lim := mapOf(get(srv, "resources", "limits"))
	req := mapOf(get(srv, "resources", "requests"))
	if sf["hugepages"] == "true" {
		hp, err := parseQuantity(str(lim["hugepages-2Mi"]))
		if err != nil || hp < mem {
			fail("--memory=%v with --hugepages but limit hugepages-2Mi=%v", sf["memory"], lim["hugepages-2Mi"])
		}
		if str(req["hugepages-2Mi"]) != str(lim["hugepages-2Mi"]) {
			fail("hugepages requests %v != limits %v (Kubernetes requires them equal)", req["hugepages-2Mi"], lim["hugepages-2Mi"])
		}
	} else if l, ok := lim["memory"]; ok {
		if lb, err := parseQuantity(str(l)); err != nil || lb <= mem {
			fail("--memory=%v does not fit in the memory limit %v", sf["memory"], l)
		}
	}

	// RDMA / host network on the tier.
	checkRDMA := func(who string, podSpec map[string]interface{}, c map[string]interface{}) {
		rdma := get(v, "rdma", "enabled") == true
		res := str(get(v, "rdma", "resourceName"))
		_, has := mapOf(get(c, "resources", "limits"))[res]
		if has != rdma {
			fail("%s: RDMA resource %s in limits = %v, rdma.enabled = %v", who, res, has, rdma)
		}
		caps := listOf(get(c, "securityContext", "capabilities", "add"))
		if contains(toStrings(caps), "IPC_LOCK") != rdma {
			fail("%s: IPC_LOCK added = %v, rdma.enabled = %v", who, !rdma, rdma)
		}
		hn := podSpec["hostNetwork"] == true
		if hn != (rdma && get(v, "rdma", "hostNetwork") == true) {
			fail("%s: hostNetwork = %v, want rdma.enabled && rdma.hostNetwork", who, hn)
		}
		if hn && podSpec["dnsPolicy"] != "ClusterFirstWithHostNet" {
			fail("%s: hostNetwork without dnsPolicy ClusterFirstWithHostNet cannot resolve the headless Service", who)
		}
		if nd := str(get(v, "ucx", "netDevices")); nd != "" && envValue(c, "UCX_NET_DEVICES") != nd {
			fail("%s: UCX_NET_DEVICES is %q, ucx.netDevices %q", who, envValue(c, "UCX_NET_DEVICES"), nd)
		}
	}
	checkRDMA("tier", mapOf(get(sts.obj, "spec", "template", "spec")), srv)
	if hn := get(sts.obj, "spec", "template", "spec", "hostNetwork") == true; hn {
		required := listOf(get(sts.obj, "spec", "template", "spec", "affinity", "podAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution"))
		if len(required) == 0 {
			fail("tier pods on the host network without required anti-affinity would collide on port %d", grpcPort)
		}
	}
	if tlsOn {
		if mountPathOf(srv, "tls")+"/tls.crt" != str(sf["tls_cert"]) || secretOf(sts.obj, "tls") != str(get(v, "tls", "secretName")) {
			fail("--tls-cert=%v is not in the mounted secret %v", sf["tls_cert"], get(v, "tls", "secretName"))
		}
	}
	if get(v, "auth", "enabled") == true {
		if !strings.HasPrefix(str(sf["tenant_tokens"]), mountPathOf(srv, "auth")+"/") || secretOf(sts.obj, "auth") != str(get(v, "auth", "secretName")) {
			fail("--tenant-tokens=%v is not in the mounted secret %v", sf["tenant_tokens"], get(v, "auth", "secretName"))
		}
	}

	// ServiceMonitor: present iff enabled, scraping the metrics port of a Service that has it.
	sm := r.find("ServiceMonitor", "")
	if (sm != nil) != (get(v, "tier", "serviceMonitor", "enabled") == true) {
		fail("ServiceMonitor present = %v, tier.serviceMonitor.enabled = %v", sm != nil, get(v, "tier", "serviceMonitor", "enabled"))
	}
	if sm != nil {
		sel := mapOf(get(sm.obj, "spec", "selector", "matchLabels"))
		matched := false
		for _, s := range r.all("Service") {
			if subset(sel, mapOf(get(s.obj, "metadata", "labels"))) {
				matched = true
				for _, ep := range listOf(get(sm.obj, "spec", "endpoints")) {
					if _, ok := namedPorts(get(s.obj, "spec", "ports"), "port")[str(get(ep, "port"))]; !ok {
						fail("ServiceMonitor endpoint port %v is not a port of Service %v", get(ep, "port"), get(s.obj, "metadata", "name"))
					}
				}
			}
		}
		if !matched {
			fail("ServiceMonitor selects no Service")
		}
	}

	// The worker: its flags exist, its --tier names the headless Service and the gRPC port (or
	// the same pod DNS names as --peers), its retrieval settings agree with the tier's index.
	dep := r.find("Deployment", "")
	if (dep != nil) != (get(v, "worker", "enabled") == true) {
		fail("worker Deployment present = %v, worker.enabled = %v", dep != nil, get(v, "worker", "enabled"))
	}
	if dep == nil {
		return p
	}
	wc := workerContainer(r)
	wf := flagsOf(wc)
	checkFlags("worker", workerFlags, wf, nil)
	args := toStrings(listOf(wc["args"]))
	subs, err := workerSubcommands()
	if err != nil || len(args) == 0 || !subs[args[0]] {
		fail("worker's first argument %q is not a kvrecall-worker command (%v)", first(args), keys(subs))
	}
	tier := str(wf["tier"])
	switch get(v, "worker", "tierDiscovery") {
	case "dns":
		if wantTier := fmt.Sprintf("dns:///%s.%s.svc.%s:%d", hlName, ns, domain, grpcPort); tier != wantTier {
			fail("worker --tier=%s, want the headless Service %s", tier, wantTier)
		}
	case "static":
		if tier != podDNSNames {
			fail("worker --tier=%s is not the StatefulSet's pod DNS names (the servers' --peers) %s", tier, podDNSNames)
		}
	}
	if rep := toInt(wf["replication"]); rep < 1 || rep > replicas {
		fail("worker --replication=%d with %d tier nodes", rep, replicas)
	}
	if wf["flagfile"] != "/etc/kvrecall/config/worker.flags" || !mountsConfig(dep.obj, wc, str(get(cm.obj, "metadata", "name"))) {
		fail("worker does not read worker.flags from the mounted ConfigMap")
	}
	if got := get(dep.obj, "spec", "template", "metadata", "annotations", "checksum/config"); got != checksum {
		fail("worker pods' checksum/config %v is not the ConfigMap's", got)
	}
	wflags, tflags := flagFiles["worker.flags"], flagFiles["tier.flags"]
	if wflags["dense_layers"] != tflags["auto_index_first_layer"] {
		fail("worker dense_layers=%s but tier auto_index_first_layer=%s", wflags["dense_layers"], tflags["auto_index_first_layer"])
	}
	if wflags["sink_tokens"] != tflags["auto_index_token_begin"] {
		fail("worker sink_tokens=%s but tier auto_index_token_begin=%s", wflags["sink_tokens"], tflags["auto_index_token_begin"])
	}
	if !subset(mapOf(get(dep.obj, "spec", "selector", "matchLabels")), mapOf(get(dep.obj, "spec", "template", "metadata", "labels"))) {
		fail("worker Deployment selector does not match its pods")
	}
	for _, s := range []*doc{headless, client} {
		if subset(mapOf(get(s.obj, "spec", "selector")), mapOf(get(dep.obj, "spec", "template", "metadata", "labels"))) {
			fail("Service %v also selects worker pods", get(s.obj, "metadata", "name"))
		}
	}
	if gpus := toInt(get(v, "worker", "gpus")); toInt(get(wc, "resources", "limits", "nvidia.com/gpu")) != gpus {
		fail("worker nvidia.com/gpu limit %v, worker.gpus %d", get(wc, "resources", "limits", "nvidia.com/gpu"), gpus)
	}
	if mp := str(get(v, "worker", "model", "path")); str(wf["model"]) != mp {
		fail("worker --model=%v, worker.model.path %s", wf["model"], mp)
	}
	if get(v, "auth", "enabled") == true {
		if !strings.HasPrefix(str(wf["tier_token_file"]), mountPathOf(wc, "auth")+"/") || secretOf(dep.obj, "auth") != str(get(v, "auth", "workerSecretName")) {
			fail("worker --tier-token-file=%v is not in the mounted secret %v", wf["tier_token_file"], get(v, "auth", "workerSecretName"))
		}
	} else if _, ok := wf["tier_token_file"]; ok {
		fail("worker --tier-token-file without auth.enabled")
	}
	checkRDMA("worker", mapOf(get(dep.obj, "spec", "template", "spec")), wc)
	return p
}

// ---------------------------------------------------------------------------------------------
// Helpers over the parsed documents.

func (r *release) all(kind string) []*doc {
	var out []*doc
	for i := range r.docs {
		if r.docs[i].obj["kind"] == kind {
			out = append(out, &r.docs[i])
		}
	}
	return out
}

// find returns the first document of kind whose kvrecall.io/service label is service ("" = any).
func (r *release) find(kind, service string) *doc {
	for _, d := range r.all(kind) {
		if service == "" || get(d.obj, "metadata", "labels", "kvrecall.io/service") == service {
			return d
		}
	}
	return nil
}

func (r *release) sts() *doc { return r.find("StatefulSet", "") }

func container(d *doc, name string) map[string]interface{} {
	if d == nil {
		return nil
	}
	for _, c := range listOf(get(d.obj, "spec", "template", "spec", "containers")) {
		if get(c, "name") == name {
			return mapOf(c)
		}
	}
	return nil
}

func serverContainer(r *release) map[string]interface{} { return container(r.sts(), "server") }
func workerContainer(r *release) map[string]interface{} {
	return container(r.find("Deployment", ""), "worker")
}

// flagsOf parses a container's args as kvrecall's flag parser does: "--a-b=v" and "--a_b=v" are
// the flag a_b; a bare "--a" is a boolean true.
func flagsOf(c map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for _, a := range toStrings(listOf(c["args"])) {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, val, hasVal := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		name = strings.ReplaceAll(name, "-", "_")
		if hasVal {
			out[name] = val
		} else {
			out[name] = "true"
		}
	}
	return out
}

func setFlag(c map[string]interface{}, name, value string) {
	args := listOf(c["args"])
	for i, a := range args {
		if n, _, _ := strings.Cut(strings.TrimPrefix(str(a), "--"), "="); strings.ReplaceAll(n, "-", "_") == name {
			args[i] = "--" + strings.ReplaceAll(name, "_", "-") + "=" + value
		}
	}
}

func namedPorts(ports interface{}, field string) map[string]int {
	out := map[string]int{}
	for _, p := range listOf(ports) {
		out[str(get(p, "name"))] = toInt(get(p, field))
	}
	return out
}

func mountPathOf(c map[string]interface{}, volume string) string {
	for _, m := range listOf(c["volumeMounts"]) {
		if get(m, "name") == volume {
			return str(get(m, "mountPath"))
		}
	}
	return ""
}

func secretOf(workload map[string]interface{}, volume string) string {
	for _, vol := range listOf(get(workload, "spec", "template", "spec", "volumes")) {
		if get(vol, "name") == volume {
			return str(get(vol, "secret", "secretName"))
		}
	}
	return ""
}

func mountsConfig(workload, c map[string]interface{}, cmName string) bool {
	for _, vol := range listOf(get(workload, "spec", "template", "spec", "volumes")) {
		if get(vol, "configMap", "name") == cmName {
			return mountPathOf(c, str(get(vol, "name"))) == "/etc/kvrecall/config"
		}
	}
	return false
}

func hasPodNameEnv(c map[string]interface{}) bool {
	for _, e := range listOf(c["env"]) {
		if get(e, "name") == "POD_NAME" && get(e, "valueFrom", "fieldRef", "fieldPath") == "metadata.name" {
			return true
		}
	}
	return false
}

func envValue(c map[string]interface{}, name string) string {
	for _, e := range listOf(c["env"]) {
		if get(e, "name") == name {
			return str(get(e, "value"))
		}
	}
	return ""
}

// parseKvBytes is common/units.cc ParseBytes: digits then B, K/KB/KiB, M.., G.., T.. (powers of 2).
func parseKvBytes(s string) (int64, error) {
	mm := regexp.MustCompile(`^(\d+)\s*([A-Za-z]*)$`).FindStringSubmatch(strings.TrimSpace(s))
	if mm == nil {
		return 0, fmt.Errorf("not a kvrecall size")
	}
	n, _ := strconv.ParseInt(mm[1], 10, 64)
	shift := map[string]uint{"": 0, "B": 0, "K": 10, "KB": 10, "KIB": 10, "M": 20, "MB": 20, "MIB": 20,
		"G": 30, "GB": 30, "GIB": 30, "T": 40, "TB": 40, "TIB": 40}
	sh, ok := shift[strings.ToUpper(mm[2])]
	if !ok || n == 0 {
		return 0, fmt.Errorf("kvrecall-server would refuse it (want e.g. 512MiB, 8GiB)")
	}
	return n << sh, nil
}

// parseQuantity reads the Kubernetes quantities the chart uses (Ki/Mi/Gi/Ti, k/M/G/T, plain).
func parseQuantity(s string) (int64, error) {
	mm := regexp.MustCompile(`^(\d+)([KMGT]i?|k)?$`).FindStringSubmatch(strings.TrimSpace(s))
	if mm == nil {
		return 0, fmt.Errorf("quantity %q", s)
	}
	n, _ := strconv.ParseInt(mm[1], 10, 64)
	mult := map[string]int64{"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
		"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[mm[2]]
	return n * mult, nil
}

func m(kv ...interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i].(string)] = kv[i+1]
	}
	return out
}

func get(v interface{}, path ...interface{}) interface{} {
	for _, k := range path {
		switch key := k.(type) {
		case string:
			mm, ok := v.(map[string]interface{})
			if !ok {
				return nil
			}
			v = mm[key]
		case int:
			l, ok := v.([]interface{})
			if !ok || key >= len(l) {
				return nil
			}
			v = l[key]
		}
	}
	return v
}

func setAt(root map[string]interface{}, value interface{}, path ...interface{}) {
	parent := get(root, path[:len(path)-1]...)
	switch key := path[len(path)-1].(type) {
	case string:
		parent.(map[string]interface{})[key] = value
	case int:
		parent.([]interface{})[key] = value
	}
}

func mapOf(v interface{}) map[string]interface{} { mm, _ := v.(map[string]interface{}); return mm }
func listOf(v interface{}) []interface{}         { l, _ := v.([]interface{}); return l }
func str(v interface{}) string {
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}
func toInt(v interface{}) int {
	i, _ := strconv.Atoi(str(v))
	return i
}
func intAt(v interface{}, path ...interface{}) int { return toInt(get(v, path...)) }
func pathOf(dotted string) []interface{} {
	var out []interface{}
	for _, k := range strings.Split(dotted, ".") {
		out = append(out, k)
	}
	return out
}
func toStrings(l []interface{}) []string {
	out := make([]string, len(l))
	for i, x := range l {
		out[i] = str(x)
	}
	return out
}
func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
func subset(a, b map[string]interface{}) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
func first(l []string) string {
	if len(l) == 0 {
		return ""
	}
	return l[0]
}
func keys(mm map[string]bool) []string {
	var out []string
	for k := range mm {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func dump(r *release) string {
	var b strings.Builder
	for _, d := range r.docs {
		fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", d.source, d.text)
	}
	return b.String()
}
