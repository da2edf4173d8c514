#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite (unit, integration).
# Tests labelled `gpu` skip themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== build"
time scripts/build.sh
echo "== tests"
cd "${BUILD_DIR:-build}"
ctest --output-on-failure -j "$(nproc)" --timeout 600
