#!/bin/sh
# Adds NVIDIA's CUDA apt repository for Debian 12 (signed by NVIDIA's keyring package), so that
# the CUDA toolkit (build stage) and the CUDA runtime libraries (runtime stage) come from the
# same repository and the same CUDA version. NVIDIA publishes no Debian-based nvidia/cuda images;
# its Ubuntu ones would not carry Debian 12's gRPC, Abseil and UCX that the binaries link against.
set -eu
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl
curl -fsSL -o /tmp/cuda-keyring.deb \
  https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
dpkg -i /tmp/cuda-keyring.deb
rm /tmp/cuda-keyring.deb
apt-get update
