package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

type fileList []string

func (f *fileList) String() string     { return strings.Join(*f, ",") }
func (f *fileList) Set(v string) error { *f = append(*f, v); return nil }

// helm-render [-f values.yaml]... [-name RELEASE] [-namespace NS] [-kube-version v1.29.0]
//
//	[-api-versions monitoring.coreos.com/v1,...] [-notes] CHART_DIR
//
// prints the manifests as `helm template` does ("---" + "# Source: <template>" before each).
func main() {
	var files fileList
	flag.Var(&files, "f", "values file (repeatable; later files win)")
	name := flag.String("name", "kvrecall", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kube := flag.String("kube-version", "v1.29.0", "Kubernetes version for .Capabilities")
	apis := flag.String("api-versions", "", "comma-separated extra API versions for .Capabilities.APIVersions")
	notes := flag.Bool("notes", false, "also print NOTES.txt")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm-render [-f values.yaml]... [-name R] [-namespace NS] CHART_DIR")
		os.Exit(2)
	}
	chart, err := LoadChart(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	values := chart.Values
	for _, f := range files {
		v, err := ReadValues(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error:", err)
			os.Exit(1)
		}
		values = MergeValues(values, v)
	}
	opts := ReleaseOptions{Name: *name, Namespace: *namespace, KubeVersion: *kube}
	if *apis != "" {
		opts.APIVersions = strings.Split(*apis, ",")
	}
	out, err := Render(chart, values, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	for _, m := range out.Manifests() {
		fmt.Printf("---\n# Source: %s\n%s\n", m.Source, strings.TrimRight(m.Text, "\n"))
	}
	if *notes {
		fmt.Printf("\nNOTES:\n%s\n", out.Notes)
	}
}
