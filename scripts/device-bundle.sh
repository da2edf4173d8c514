#!/usr/bin/env bash
# Packs built binaries and the non-system shared libraries they need into .bundle/ (git-ignored),
# so they run on a machine that has none of our Debian packages (the GPU machine):
#   .bundle/bin/<binaries>   .bundle/lib/*.so*   .bundle/lib/ucx/*.so* (UCX transport modules)
#   .bundle/env.sh           source it there: sets LD_LIBRARY_PATH and UCX_MODULE_DIR
# Usage: scripts/device-bundle.sh [BINARY ...]   (default: every binary in build/bin; ucx_perftest
# is always added when installed). BUNDLE_PACK=1 packs bin/ and lib/ into .bundle/bundle.tar.xz
# (a third of the size, for the 64 MiB carry limit); env.sh unpacks it on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BUILD_DIR:-build}/bin
OUT=.bundle
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib/ucx"
if [ $# -eq 0 ]; then set -- "$BIN_DIR"/*; fi
# ucx_perftest too, for the benchmarks that measure against it.
if command -v ucx_perftest >/dev/null; then set -- "$@" "$(command -v ucx_perftest)"; fi
# glibc and the compiler runtime come from the target system (newer there, backward compatible);
# so do the CUDA driver and cuBLAS (its /usr/local/cuda/lib64; libcublasLt alone is 540 MB), and
# NCCL (218 MB here; there it is PyTorch's, nvidia-nccl-cu13, found by env.sh).
SKIP='^(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux-x86-64|libresolv|libcuda|libnvidia|libcublas|libcublasLt|libnccl)[.-]'
for b in "$@"; do
  cp "$b" "$OUT/bin/"
  strip --strip-unneeded "$OUT/bin/$(basename "$b")" 2>/dev/null || true
  ldd "$b" | awk '/=> \//{print $3}' | while read -r lib; do
    name=$(basename "$lib")
    [[ "$name" =~ $SKIP ]] && continue
    [ -e "$OUT/lib/$name" ] || cp -L "$lib" "$OUT/lib/$name"
  done
done
# UCX loads its transports (tcp, shm, ib, cuda) as modules at run time.
for m in /usr/lib/x86_64-linux-gnu/ucx/*.so.0; do
  cp -L "$m" "$OUT/lib/ucx/"
  ldd "$m" | awk '/=> \//{print $3}' | while read -r lib; do
    name=$(basename "$lib")
    [[ "$name" =~ $SKIP ]] && continue
    [ -e "$OUT/lib/$name" ] || cp -L "$lib" "$OUT/lib/$name"
  done
done
strip --strip-unneeded "$OUT"/lib/*.so* "$OUT"/lib/ucx/*.so* 2>/dev/null || true
cat >"$OUT/env.sh" <<'ENV'
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -f "$here/bundle.tar.xz" ] && [ ! -d "$here/bin" ]; then
  mkdir -p /tmp/kvrecall-bundle && tar -C /tmp/kvrecall-bundle -xJf "$here/bundle.tar.xz"
  here=/tmp/kvrecall-bundle
fi
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -d /usr/local/cuda/lib64 ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/cuda/lib64"; fi
# NCCL: the toolkit's when it has one, else PyTorch's wheel.
if [ ! -e /usr/local/cuda/lib64/libnccl.so.2 ]; then
  nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
  if [ -n "$nccl" ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$nccl"; fi
fi
# NVLink multicast stays off on shared machines (the device README).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export UCX_MODULE_DIR="$here/lib/ucx"
export PATH="$here/bin:$PATH"
ENV
if [ "${BUNDLE_PACK:-0}" = 1 ]; then
  tar -C "$OUT" -cf - bin lib | xz -T0 -6 >"$OUT/bundle.tar.xz"
  rm -rf "$OUT/bin" "$OUT/lib"
fi
du -sh "$OUT"
