# syntax=docker/dockerfile:1
# kvrecall-worker (a decode worker) and kvrecallctl on a CUDA runtime base. Build from the
# repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t REGISTRY/kvrecall-worker:TAG .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg KVRECALL_CUDA=OFF ...   # CPU only
#
# Build stage: Debian 12 + scripts/setup.sh + scripts/build.sh, as CI, plus NVIDIA's CUDA toolkit
# for Debian 12 (the build compiles the CUDA backend when it finds nvcc: KVRECALL_CUDA=AUTO).
# Runtime stage: a CUDA runtime base built the way nvidia/cuda:*-runtime is (cudart + cuBLAS from
# NVIDIA's repository, NVIDIA_* variables for the NVIDIA container toolkit, which mounts the
# driver), on Debian 12 so that the Debian libraries the binaries link against are the same.
ARG DEBIAN_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim
# NVIDIA's package suffix for the CUDA version: cuda-cudart-12-4, libcublas-12-4, ...
ARG CUDA_PKG_VERSION=12-4

FROM ${DEBIAN_IMAGE} AS build
ARG CUDA_PKG_VERSION
ARG KVRECALL_CUDA=AUTO
ARG CUDA_ARCHITECTURES="80;90"
ARG CMAKE_BUILD_TYPE=RelWithDebInfo
WORKDIR /src
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/add-cuda-repo.sh /usr/local/sbin/add-cuda-repo.sh
RUN if [ "${KVRECALL_CUDA}" != "OFF" ]; then \
      add-cuda-repo.sh \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           cuda-nvcc-${CUDA_PKG_VERSION} cuda-cudart-dev-${CUDA_PKG_VERSION} libcublas-dev-${CUDA_PKG_VERSION} \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY . .
RUN KVRECALL_CUDA=${KVRECALL_CUDA} CMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE} \
      CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
      scripts/build.sh kvrecall-worker kvrecallctl \
 && mkdir -p /out/bin \
 && cp build/bin/kvrecall-worker build/bin/kvrecallctl /out/bin/ \
 && strip --strip-debug /out/bin/* \
 && deploy/docker/runtime-packages.sh /out/bin/* > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt

FROM ${RUNTIME_IMAGE} AS cuda-runtime
ARG CUDA_PKG_VERSION
COPY deploy/docker/add-cuda-repo.sh /usr/local/sbin/add-cuda-repo.sh
RUN add-cuda-repo.sh \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cuda-cudart-${CUDA_PKG_VERSION} libcublas-${CUDA_PKG_VERSION} \
 && apt-get purge -y curl && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/usr/local/cuda/bin:${PATH} \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64

FROM cuda-runtime AS runtime
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
# The list names only packages of Debian 12 and of the CUDA repository configured above.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive xargs -a /tmp/runtime-packages.txt \
      apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --system --gid 10001 kvrecall \
 && useradd --system --uid 10001 --gid kvrecall --home-dir /var/lib/kvrecall --no-create-home \
      --shell /usr/sbin/nologin kvrecall \
 && mkdir -p /var/lib/kvrecall && chown kvrecall:kvrecall /var/lib/kvrecall
COPY --from=build /out/bin/ /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/kvrecall
ENTRYPOINT ["kvrecall-worker"]
