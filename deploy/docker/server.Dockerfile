# syntax=docker/dockerfile:1
# kvrecall-server (a tier node) and kvrecallctl. Build from the repository root:
#
#   docker build -f deploy/docker/server.Dockerfile -t REGISTRY/kvrecall-server:TAG .
#
# The build stage is a plain Debian 12 that runs scripts/setup.sh and scripts/build.sh, the
# same two steps CI runs (.ci/run -> scripts/test.sh), so the image is built from exactly the
# packages the tests ran against. The runtime stage is debian:12-slim with only the packages
# that own the shared libraries the binaries load (runtime-packages.sh), and a non-root user.
ARG DEBIAN_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS build
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the package list changes.
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh && rm -rf /var/lib/apt/lists/*
COPY . .
ARG CMAKE_BUILD_TYPE=RelWithDebInfo
RUN KVRECALL_CUDA=OFF CMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE} scripts/build.sh kvrecall-server kvrecallctl \
 && mkdir -p /out/bin \
 && cp build/bin/kvrecall-server build/bin/kvrecallctl /out/bin/ \
 && strip --strip-debug /out/bin/* \
 && deploy/docker/runtime-packages.sh /out/bin/* > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive xargs -a /tmp/runtime-packages.txt \
      apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --system --gid 10001 kvrecall \
 && useradd --system --uid 10001 --gid kvrecall --home-dir /var/lib/kvrecall --no-create-home \
      --shell /usr/sbin/nologin kvrecall \
 && mkdir -p /var/lib/kvrecall && chown kvrecall:kvrecall /var/lib/kvrecall
COPY --from=build /out/bin/ /usr/local/bin/
# Numeric, so that runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/kvrecall
# gRPC (kvrecall.v1 + grpc.health.v1) and HTTP /metrics, /healthz.
EXPOSE 7070 9090
ENTRYPOINT ["kvrecall-server"]
CMD ["--listen=0.0.0.0:7070", "--metrics-port=9090"]
