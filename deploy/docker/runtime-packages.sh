#!/usr/bin/env bash
# Prints the Debian packages that own the shared libraries the given binaries load, one a line:
# the runtime stage of each image installs exactly these, so an image never lacks a library the
# build linked against, and never carries the -dev packages.
#   deploy/docker/runtime-packages.sh build/bin/kvrecall-server build/bin/kvrecallctl
set -euo pipefail
for lib in $(ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
  real=$(realpath "$lib")
  # Debian 12 is merged-/usr, but packages still register some files under /lib.
  for candidate in "$lib" "$real" "${real#/usr}" "/usr${lib}"; do
    if owner=$(dpkg -S "$candidate" 2>/dev/null); then
      echo "${owner%%:*}"
      continue 2
    fi
  done
  echo "runtime-packages: no package owns $lib" >&2
  exit 1
done | sort -u
