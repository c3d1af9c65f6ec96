# vdiff's container images, one Dockerfile, two targets:
#
#   docker build --target cpu  -t vdiff:cpu  .    # Debian 12 + Node 20, the CPU engine (the default target)
#   docker build --target cuda -t vdiff:cuda .    # the CUDA runtime base, the CPU and CUDA engines
#
#   docker run --rm -p 8000:8000 vdiff:cpu                                   # the embedded model
#   docker run --rm -p 8000:8000 --gpus all -v /srv/llada-8b:/models/model:ro \
#     -e VDIFF_MODEL=/models/model vdiff:cuda                                # a mounted model
#
# The entry point is `vdiff serve`; every setting is a VDIFF_* variable (or a flag after the image name).
# Both images run as the unprivileged user vdiff (uid 10001). The embedded model is baked in at
# /app/models/shakespeare (the default of VDIFF_MODEL); bake another with a two-line Dockerfile
# (FROM vdiff:cuda / COPY --chown=10001:10001 DIR /models/model) and VDIFF_MODEL=/models/model.
#
# deploy/scripts/dockerfile-run.ts runs this file's steps for the cpu target on a plain Debian 12
# machine, without a container builder (CI does, in .ci/run); RUN steps use paths relative to WORKDIR
# for that reason.

ARG NODE_VERSION=20.20.2
ARG CUDA_VERSION=13.0.1
ARG CUDA_UBUNTU=ubuntu24.04

# --- build: the CUDA engine (nvcc from the CUDA devel image, Node copied from the Node image) ------------
FROM node:${NODE_VERSION}-bookworm-slim AS node
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS build-cuda
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules /usr/local/lib/node_modules
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && apt-get update \
 && apt-get install -y --no-install-recommends cmake ninja-build g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY bin bin
COPY native native
COPY src src
COPY models/shakespeare models/shakespeare
# nvcc is found: the CUDA backend is built (sm_80, sm_90 and PTX; cuBLAS is opened at run time).
RUN npm run build:native
RUN npm run build:ts
RUN npm prune --omit=dev --no-audit --no-fund

# --- the CUDA image: the CUDA runtime base (cuBLAS included) --------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS cuda
COPY --from=node /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
RUN id -u vdiff >/dev/null 2>&1 \
 || (groupadd --system --gid 10001 vdiff && useradd --system --uid 10001 --gid vdiff --no-create-home --home-dir /app --shell /usr/sbin/nologin vdiff)
COPY --from=build-cuda /app/package.json ./
COPY --from=build-cuda /app/bin bin
COPY --from=build-cuda /app/dist dist
COPY --from=build-cuda /app/build/native/Release build/native/Release
COPY --from=build-cuda /app/node_modules node_modules
COPY --from=build-cuda /app/models models
ENV NODE_ENV=production VDIFF_HOST=0.0.0.0 VDIFF_PORT=8000 VDIFF_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m \
  CMD ["node", "-e", "fetch(`http://127.0.0.1:${process.env.VDIFF_PORT}/health/ready`).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "/app/bin/vdiff.js", "serve"]

# --- build: the CPU engine and the TypeScript ------------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm AS build-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake ninja-build g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY bin bin
COPY native native
COPY src src
COPY models/shakespeare models/shakespeare
RUN npm run build:native -- --CDVDIFF_CUDA=OFF
RUN npm run build:ts
RUN npm prune --omit=dev --no-audit --no-fund

# --- the CPU image ---------------------------------------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm-slim AS cpu
WORKDIR /app
RUN id -u vdiff >/dev/null 2>&1 \
 || (groupadd --system --gid 10001 vdiff && useradd --system --uid 10001 --gid vdiff --no-create-home --home-dir /app --shell /usr/sbin/nologin vdiff)
COPY --from=build-cpu /app/package.json ./
COPY --from=build-cpu /app/bin bin
COPY --from=build-cpu /app/dist dist
COPY --from=build-cpu /app/build/native/Release build/native/Release
COPY --from=build-cpu /app/node_modules node_modules
COPY --from=build-cpu /app/models models
ENV NODE_ENV=production VDIFF_HOST=0.0.0.0 VDIFF_PORT=8000
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m \
  CMD ["node", "-e", "fetch(`http://127.0.0.1:${process.env.VDIFF_PORT}/health/ready`).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "/app/bin/vdiff.js", "serve"]
