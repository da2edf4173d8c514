// Package main renders a Helm chart the way `helm template` does, for machines without Helm
// (it is not packaged for Debian): Go text/template with the sprig function library plus Helm's
// own functions (include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup), the
// built-in objects .Values (values.yaml deep-merged with -f files, later files win, null deletes
// a key), .Release, .Chart, .Capabilities and .Template, and Helm's conventions: every file
// under templates/ is parsed into one template set, files whose name starts with "_" are only
// definitions, NOTES.txt is rendered apart from the manifests, missing keys render as empty.
//
// It is built from Debian's golang-go, golang-github-masterminds-sprig-dev and
// golang-gopkg-yaml.v3-dev in GOPATH mode, offline (see run.sh).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/semver/v3"
	"github.com/Masterminds/sprig/v3"
	"gopkg.in/yaml.v3"
)

// Chart is a chart directory loaded into memory.
type Chart struct {
	Name      string
	Metadata  map[string]interface{} // Chart.yaml with Helm's field names (Name, Version, AppVersion, ...)
	Values    map[string]interface{} // values.yaml
	Templates map[string]string      // "<chart>/templates/<file>" -> text
}

// ReleaseOptions are what `helm template NAME CHART -n NAMESPACE` takes from its command line.
type ReleaseOptions struct {
	Name        string
	Namespace   string
	KubeVersion string   // e.g. "v1.29.0"
	APIVersions []string // extra API versions the cluster serves (helm template --api-versions)
}

// Rendered is the output of one render.
type Rendered struct {
	Files map[string]string // template name -> rendered text (manifests only, no partials, no NOTES)
	Notes string
}

// LoadChart reads Chart.yaml, values.yaml and templates/ of a chart directory.
func LoadChart(dir string) (*Chart, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	var meta map[string]interface{}
	if err := yaml.Unmarshal(raw, &meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %v", err)
	}
	name, _ := meta["name"].(string)
	if name == "" {
		return nil, fmt.Errorf("Chart.yaml: no name")
	}
	c := &Chart{Name: name, Metadata: map[string]interface{}{}, Templates: map[string]string{}}
	for k, v := range meta {
		c.Metadata[helmFieldName(k)] = v
	}
	if c.Values, err = ReadValues(filepath.Join(dir, "values.yaml")); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(dir, "templates"))
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		text, err := os.ReadFile(filepath.Join(dir, "templates", e.Name()))
		if err != nil {
			return nil, err
		}
		c.Templates[path.Join(name, "templates", e.Name())] = string(text)
	}
	return c, nil
}

// helmFieldName maps a Chart.yaml key to the field name templates use (.Chart.AppVersion).
func helmFieldName(k string) string {
	if k == "apiVersion" {
		return "APIVersion"
	}
	return strings.ToUpper(k[:1]) + k[1:]
}

// ReadValues reads one values file; an empty file is an empty map.
func ReadValues(file string) (map[string]interface{}, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	v := map[string]interface{}{}
	if err := yaml.Unmarshal(raw, &v); err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	if v == nil {
		v = map[string]interface{}{}
	}
	return jsonNumbers(v).(map[string]interface{}), nil
}

// jsonNumbers turns every integer into a float64, as Helm's values loader (sigs.k8s.io/yaml,
// which goes through JSON) does, so that a template that prints a number without `int` renders
// here as it does under Helm (1000000 -> 1e+06).
func jsonNumbers(v interface{}) interface{} {
	switch x := v.(type) {
	case map[string]interface{}:
		for k, e := range x {
			x[k] = jsonNumbers(e)
		}
	case []interface{}:
		for i, e := range x {
			x[i] = jsonNumbers(e)
		}
	case int:
		return float64(x)
	case int64:
		return float64(x)
	case uint64:
		return float64(x)
	}
	return v
}

// MergeValues returns base overridden by over, as Helm coalesces -f files: maps merge key by
// key, any other value replaces, and a null in over deletes the key. Neither input is modified.
func MergeValues(base, over map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(base))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		if v == nil {
			delete(out, k)
			continue
		}
		bm, bok := out[k].(map[string]interface{})
		om, ook := v.(map[string]interface{})
		if bok && ook {
			out[k] = MergeValues(bm, om)
		} else {
			out[k] = v
		}
	}
	return out
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion map[string]string
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has is .Capabilities.APIVersions.Has "group/version" (or "group/version/Kind").
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// builtinAPIVersions are the API versions of a plain cluster that the chart may probe for.
var builtinAPIVersions = []string{"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}

// Render renders chart c with values (already merged over c.Values) as release opts.
func Render(c *Chart, values map[string]interface{}, opts ReleaseOptions) (*Rendered, error) {
	if opts.KubeVersion == "" {
		opts.KubeVersion = "v1.29.0"
	}
	kv, err := semver.NewVersion(opts.KubeVersion)
	if err != nil {
		return nil, fmt.Errorf("kube version %q: %v", opts.KubeVersion, err)
	}
	if want, ok := c.Metadata["KubeVersion"].(string); ok && want != "" {
		constraint, err := semver.NewConstraint(want)
		if err != nil {
			return nil, fmt.Errorf("Chart.yaml kubeVersion %q: %v", want, err)
		}
		if !constraint.Check(kv) {
			return nil, fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", want, opts.KubeVersion)
		}
	}
	caps := &Capabilities{
		KubeVersion: KubeVersion{
			Version: opts.KubeVersion, GitVersion: opts.KubeVersion,
			Major: fmt.Sprint(kv.Major()), Minor: fmt.Sprint(kv.Minor()),
		},
		APIVersions: append(VersionSet(builtinAPIVersions), opts.APIVersions...),
		HelmVersion: map[string]string{"Version": "v3.14.0"},
	}
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": opts.Name, "Namespace": opts.Namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart":        c.Metadata,
		"Capabilities": caps,
	}

	t := template.New("gotpl").Option("missingkey=zero")
	t.Funcs(funcMap(t))
	names := make([]string, 0, len(c.Templates))
	for n := range c.Templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := t.New(n).Parse(c.Templates[n]); err != nil {
			return nil, fmt.Errorf("parse error in %v", err)
		}
	}
	out := &Rendered{Files: map[string]string{}}
	basePath := path.Join(c.Name, "templates")
	for _, n := range names {
		if strings.HasPrefix(path.Base(n), "_") {
			continue
		}
		data := make(map[string]interface{}, len(top)+1)
		for k, v := range top {
			data[k] = v
		}
		data["Template"] = map[string]interface{}{"Name": n, "BasePath": basePath}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, n, data); err != nil {
			return nil, cleanError(err)
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if path.Base(n) == "NOTES.txt" {
			out.Notes = text
		} else {
			out.Files[n] = text
		}
	}
	return out, nil
}

// cleanError turns text/template's wrapping of an error returned by fail/required into Helm's
// "execution error at (file:line:col): message".
func cleanError(err error) error {
	msg := err.Error()
	if i := strings.Index(msg, "error calling "); i >= 0 {
		loc := strings.TrimPrefix(msg[:i], "template: ")
		rest := msg[i+len("error calling "):]
		if j := strings.Index(rest, ": "); j >= 0 {
			rest = rest[j+2:]
		}
		if k := strings.Index(loc, ": executing"); k >= 0 {
			loc = loc[:k]
		}
		return fmt.Errorf("execution error at (%s): %s", strings.TrimSuffix(loc, ": "), rest)
	}
	return err
}

func funcMap(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	// Helm removes these two so that a render cannot depend on the machine it runs on.
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYaml
	f["fromYaml"] = fromYaml
	f["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["required"] = func(warn string, val interface{}) (interface{}, error) {
		if val == nil {
			return val, fmt.Errorf("%s", warn)
		}
		if s, ok := val.(string); ok && s == "" {
			return val, fmt.Errorf("%s", warn)
		}
		return val, nil
	}
	// `helm template` has no cluster to look up: lookup answers an empty object.
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	const maxDepth = 1000
	depth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] > maxDepth {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		clone.Option("missingkey=zero")
		parsed, err := clone.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %v", text, err)
		}
		var buf strings.Builder
		if err := parsed.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %v", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}

// toYaml is Helm's: block YAML with two-space indents, no trailing newline.
func toYaml(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	enc.Close()
	return strings.TrimSuffix(buf.String(), "\n")
}

func fromYaml(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

// Manifests splits rendered files into YAML documents (Helm's "---" separation), dropping empty
// ones, in a stable order, each with the template it came from.
func (r *Rendered) Manifests() []Manifest {
	names := make([]string, 0, len(r.Files))
	for n := range r.Files {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Manifest
	for _, n := range names {
		for _, doc := range splitDocuments(r.Files[n]) {
			out = append(out, Manifest{Source: n, Text: doc})
		}
	}
	return out
}

// Manifest is one YAML document of the output.
type Manifest struct {
	Source string
	Text   string
}

func splitDocuments(text string) []string {
	var docs []string
	for _, d := range strings.Split("\n"+text, "\n---") {
		if !isBlankYAML(d) {
			docs = append(docs, strings.TrimLeft(d, "\n"))
		}
	}
	return docs
}

func isBlankYAML(d string) bool {
	for _, line := range strings.Split(d, "\n") {
		l := strings.TrimSpace(line)
		if l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}
