#!/usr/bin/env bash
# Builds and runs deploy/helm-render offline from Debian's Go packages (golang-go,
# golang-github-masterminds-sprig-dev, golang-gopkg-yaml.v3-dev), in GOPATH mode: Debian installs
# the sources under /usr/share/gocode/src without the module files that module mode would need
# (github.com/Masterminds/goutils has no go.mod), so a small GOPATH overlay maps the two "/v3"
# import paths onto Debian's directories and nothing is ever downloaded.
#   deploy/helm-render/run.sh test [go test flags]      the chart render test
#   deploy/helm-render/run.sh render [-f values.yaml]... deploy/helm/kvrecall
#                                                        print the manifests, like `helm template`
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
gocode=/usr/share/gocode/src
for p in github.com/Masterminds/sprig github.com/Masterminds/semver gopkg.in/yaml.v3; do
  [ -d "$gocode/$p" ] || { echo "helm-render: $gocode/$p is missing (run scripts/setup.sh)" >&2; exit 1; }
done
overlay="$root/${BUILD_DIR:-build}/helm-render-gopath"
mkdir -p "$overlay/src/github.com/Masterminds/sprig" "$overlay/src/github.com/Masterminds/semver"
ln -sfn "$gocode/github.com/Masterminds/sprig" "$overlay/src/github.com/Masterminds/sprig/v3"
ln -sfn "$gocode/github.com/Masterminds/semver" "$overlay/src/github.com/Masterminds/semver/v3"
export GO111MODULE=off GOPATH="$overlay:/usr/share/gocode" GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$root/${BUILD_DIR:-build}/helm-render-gocache}"
cmd=${1:-test}
shift || true
cd "$here"
case "$cmd" in
  test) exec go test -count=1 "$@" . ;;
  render) go build -o "$overlay/helm-render" . && cd "$root" && exec "$overlay/helm-render" "$@" ;;
  *) echo "usage: $0 test|render ..." >&2; exit 2 ;;
esac
