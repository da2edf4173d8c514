package main

// The Helm behaviours the chart test relies on, checked on a throwaway chart, so that a chart
// that renders here renders the same under `helm template`.

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeChart(t *testing.T, files map[string]string) *Chart {
	t.Helper()
	dir := t.TempDir()
	for name, text := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c, err := LoadChart(dir)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestEngineBehavesLikeHelm(t *testing.T) {
	c := writeChart(t, map[string]string{
		"Chart.yaml":       "apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: \"9.9\"\nkubeVersion: \">=1.24.0-0\"\n",
		"values.yaml":      "a: {b: 1, c: 2}\nbig: 1000000\nlist: [x, z]\nname: n\ntext: \"{{ .Values.name }}-t\"\n",
		"templates/_h.tpl": `{{- define "demo.twice" -}}{{ . }}{{ . }}{{- end -}}`,
		"templates/cm.yaml": `kind: ConfigMap
chart: {{ .Chart.Name }}-{{ .Chart.Version }}-{{ .Chart.AppVersion }}
release: {{ .Release.Name }}/{{ .Release.Namespace }}/{{ .Release.Service }}
template: {{ .Template.Name }} in {{ .Template.BasePath }}
include: {{ include "demo.twice" "ab" }}
tpl: {{ tpl .Values.text . }}
missing: [{{ .Values.nope }}]
big: {{ .Values.big }}
kube: {{ .Capabilities.KubeVersion.Major }}.{{ .Capabilities.KubeVersion.Minor }} {{ .Capabilities.APIVersions.Has "policy/v1" }} {{ .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}
a:
  {{- toYaml .Values.a | nindent 2 }}
list:
  {{- toYaml .Values.list | nindent 2 }}
---
# only a comment: not a document
---
kind: Second
`,
		"templates/NOTES.txt": "notes for {{ .Release.Name }}",
	})
	over := map[string]interface{}{"a": map[string]interface{}{"c": nil, "d": 4}, "name": "m"}
	out, err := Render(c, MergeValues(c.Values, over), ReleaseOptions{Name: "r", Namespace: "ns"})
	if err != nil {
		t.Fatal(err)
	}
	got := out.Files["demo/templates/cm.yaml"]
	for _, want := range []string{
		"chart: demo-1.2.3-9.9", "release: r/ns/Helm", "template: demo/templates/cm.yaml in demo/templates",
		"include: abab", "tpl: m-t", "missing: []", "big: 1e+06", "kube: 1.29 true false",
		"a:\n  b: 1\n  d: 4\nlist:\n  - x\n  - z",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("rendered output lacks %q:\n%s", want, got)
		}
	}
	if _, ok := out.Files["demo/templates/_h.tpl"]; ok {
		t.Error("a partial (_*.tpl) was rendered as a manifest")
	}
	if out.Notes != "notes for r" {
		t.Errorf("NOTES.txt rendered as %q", out.Notes)
	}
	if n := len(out.Manifests()); n != 2 {
		t.Errorf("%d documents, want 2 (comment-only documents are dropped)", n)
	}
	if c.Values["a"].(map[string]interface{})["c"] == nil {
		t.Error("MergeValues modified the chart's own values")
	}

	// required / fail stop the render with Helm's message format; env is not available.
	for tmpl, want := range map[string]string{
		`{{ required "x.y is required" .Values.x }}`: "execution error at (demo/templates/f.yaml:1:3): x.y is required",
		`{{ fail "no" }}`:        "execution error at (demo/templates/f.yaml:1:3): no",
		`{{ env "HOME" }}`:       `function "env" not defined`,
		`{{ include "nope" . }}`: `no template "nope"`,
	} {
		c := writeChart(t, map[string]string{"Chart.yaml": "name: demo\nversion: 1.0.0\n", "values.yaml": "", "templates/f.yaml": tmpl})
		if _, err := Render(c, c.Values, ReleaseOptions{Name: "r", Namespace: "ns"}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", tmpl, err, want)
		}
	}
	// A chart's kubeVersion constraint is checked against the cluster's version.
	old := writeChart(t, map[string]string{"Chart.yaml": "name: demo\nversion: 1.0.0\nkubeVersion: \">=1.24.0-0\"\n", "values.yaml": "", "templates/f.yaml": "kind: X\n"})
	if _, err := Render(old, old.Values, ReleaseOptions{Name: "r", Namespace: "ns", KubeVersion: "v1.23.5"}); err == nil ||
		!strings.Contains(err.Error(), "incompatible with Kubernetes v1.23.5") {
		t.Errorf("kubeVersion constraint not enforced: %v", err)
	}
}
