#!/usr/bin/env bash
# Installs kvrecall's build and test dependencies from Debian 12 packages. Idempotent: when
# everything is already installed it only checks and returns. Needs root (or sudo).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  librocksdb-dev libucx-dev ucx-utils
  libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev zlib1g-dev jq
  clang libclang-rt-dev llvm openssl
  golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
