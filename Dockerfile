# syntax=docker/dockerfile:1.7
#
# One preftune image for every component: the feedback service (`preftune serve`), the
# Kubeflow pipeline steps (collect, check-fit, train-reward, ppo, evaluate, promote), the
# schedule hook Job and the optional MLflow tracking server of the Helm chart.
#
#   CPU (default):  docker build -t REGISTRY/preftune:0.1.0 .
#   GPU (ppo step): docker build --build-arg VARIANT=cuda -t REGISTRY/preftune:0.1.0-cuda .
#
# Both variants start from the same Python base (one Python, 3.11). The GPU variant installs
# requirements/cuda.lock: PyPI's CUDA build of torch brings the CUDA runtime as nvidia-* wheels, so
# no CUDA base image is needed at run time (the node's driver is enough). DeepSpeed's fused Adam
# ops are compiled in a separate stage with the CUDA toolkit, so the final image carries no
# compiler. BuildKit builds only the stages the chosen VARIANT needs.

# Base images. PYTHON_IMAGE is pinned by digest: python:3.11-slim at the digest below, as found in
# two independent public repositories' Dockerfiles (one through the public.ecr.aws/docker/library
# mirror). It was NOT pulled or verified where this Dockerfile was written (no registry access):
# check it (`docker buildx imagetools inspect python:3.11-slim@sha256:...`), or override it with
# your mirror's digest: --build-arg PYTHON_IMAGE=registry.example.com/python:3.11-slim@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
# CUDA_DEVEL_IMAGE: the CUDA toolkit that compiles DeepSpeed's ops (VARIANT=cuda only; nothing of it
# but the compiled wheel reaches the image), pinned by the digest a public repository's probe list
# records for nvidia/cuda:13.0.1-devel-ubuntu22.04; like PYTHON_IMAGE's, NOT pulled or verified here:
# check it, or override with --build-arg CUDA_DEVEL_IMAGE=<your mirror>/cuda:13.0.1-devel-ubuntu22.04@sha256:...
# CUDA 13.0 is what PyPI's torch 2.13.0 is built with (nvidia-cuda-runtime 13.0.x in cuda.lock).
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu22.04@sha256:bb3de902bc1b522231cffea98a4d25a16ddb9fc8685a958b48d83036f46fd0c2
# cpu | cuda
ARG VARIANT=cpu
# torch's CPU build comes from the PyTorch CPU index (cpu.lock pins torch==2.13.0+cpu with hashes).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# DeepSpeed as requirements/cuda.lock pins it (its ops are compiled from that sdist).
ARG DEEPSPEED_VERSION=0.19.8
# The package version (pyproject.toml); the wheel name and the OCI version label use it.
ARG PREFTUNE_VERSION=0.1.0

# ---------------------------------------------------------------------------------------------
# builder: build the preftune wheel from the source tree (pure Python, no compiler needed).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY preftune ./preftune
COPY components ./components
COPY pipelines ./pipelines
# The build backend (setuptools, from pyproject's [build-system]) runs in pip's isolated
# build environment; only the wheel leaves this stage.
RUN pip wheel --no-deps --wheel-dir /dist . \
    && ls -l /dist

# ---------------------------------------------------------------------------------------------
# cuda-toolkit (VARIANT=cuda only): nvcc and the CUDA headers, copied into deepspeed-builder.
FROM ${CUDA_DEVEL_IMAGE} AS cuda-toolkit

# deepspeed-builder (VARIANT=cuda only): DeepSpeed compiles its CUDA ops just in time by default,
# which needs nvcc and a C++ compiler at run time. Prebuild the ops the ppo step uses into a
# wheel here, against the locked CUDA torch on the same Python as the runtime image, so that the
# runtime image stays compiler-free. (Ubuntu 22.04's toolkit runs on the base's newer glibc.)
FROM ${PYTHON_IMAGE} AS deepspeed-builder
ARG DEEPSPEED_VERSION
# Ampere, Ada, Hopper and Blackwell data-centre GPUs.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_HOME=/usr/local/cuda \
    PATH=/opt/build-venv/bin:/usr/local/cuda/bin:$PATH
COPY --from=cuda-toolkit /usr/local/cuda /usr/local/cuda
# The distribution's C++ compiler for this stage only (never in the runtime image).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,source=requirements/cuda.lock,target=/tmp/requirements.lock \
    python -m venv /opt/build-venv \
    && pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
       pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist "deepspeed==${DEEPSPEED_VERSION}"

# ---------------------------------------------------------------------------------------------
# base-cpu: the Python base, a virtual environment and the CPU build of torch (a fraction of the
# size of the CUDA one).
FROM ${PYTHON_IMAGE} AS base-cpu
ARG PYTHON_IMAGE
ARG TORCH_CPU_INDEX_URL
ENV PREFTUNE_IMAGE_VARIANT=cpu \
    PREFTUNE_BASE_IMAGE=${PYTHON_IMAGE} \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Every dependency at the version and hash of requirements/cpu.lock (pip-tools, generated from
# pyproject.toml); torch's CPU build comes from the PyTorch CPU index. The wheel is then installed
# with --no-deps, so nothing unlocked enters the image.
# The lock is bind-mounted from the build context: read, never stored in a layer.
RUN --mount=type=bind,source=requirements/cpu.lock,target=/tmp/requirements.lock \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --require-hashes --extra-index-url "${TORCH_CPU_INDEX_URL}" -r /tmp/requirements.lock

# base-cuda: the same Python base with requirements/cuda.lock (uv, hashes): PyPI's CUDA torch and its
# nvidia-* runtime wheels, then DeepSpeed replaced by the wheel with prebuilt ops from
# deepspeed-builder (bind-mounted, never copied into a layer). The driver comes from the node.
FROM ${PYTHON_IMAGE} AS base-cuda
ARG PYTHON_IMAGE
ENV PREFTUNE_IMAGE_VARIANT=cuda \
    PREFTUNE_BASE_IMAGE=${PYTHON_IMAGE} \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3013
RUN --mount=type=bind,source=requirements/cuda.lock,target=/tmp/requirements.lock \
    --mount=type=bind,from=deepspeed-builder,source=/dist,target=/tmp/deepspeed \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-deps --force-reinstall /tmp/deepspeed/deepspeed-*.whl

# ---------------------------------------------------------------------------------------------
# runtime: the image that ships. No compiler, no pip cache, no build tree, no secrets.
# (base-${VARIANT} is one of the two stages above, both FROM the digest-pinned PYTHON_IMAGE.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG PREFTUNE_VERSION
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=https://example.invalid/preftune

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREFTUNE_HOME=/var/lib/preftune \
    HOME=/var/lib/preftune \
    MPLCONFIGDIR=/tmp/matplotlib

# The wheel comes from the builder stage through a bind mount: installed, never copied into a
# layer, with --no-deps in both variants: their lock (cpu.lock, or cuda.lock with the `gpu` extra)
# already installed every dependency, and pip check proves nothing is missing.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    set -eu; \
    wheel="$(ls /tmp/dist/preftune-${PREFTUNE_VERSION}-*.whl)"; \
    pip install --no-cache-dir --no-deps "${wheel}"; \
    pip check; \
    preftune --help > /dev/null

# A CycloneDX SBOM of the installed environment, written by cyclonedx-py (cyclonedx-bom) from a
# throwaway virtual environment that is removed in the same layer.
# hadolint ignore=DL3013
RUN python -m venv /tmp/sbom \
    && /tmp/sbom/bin/pip install --no-cache-dir cyclonedx-bom==7.5.0 \
    && mkdir -p /usr/share/preftune \
    && /tmp/sbom/bin/cyclonedx-py environment --output-format JSON --output-file /usr/share/preftune/sbom.cdx.json /opt/venv \
    && rm -rf /tmp/sbom

# A fixed, numeric, non-root user (the Helm chart's securityContext uses the same UID).
# PREFTUNE_HOME and /tmp are the only writable places; with a read-only root filesystem
# the chart mounts emptyDirs (or a volume) on both. The data dir belongs to group 0 and is group
# writable: OpenShift runs the container under an arbitrary UID that is always in group 0.
RUN groupadd --system --gid 10001 preftune \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/preftune --no-create-home \
       --shell /usr/sbin/nologin preftune \
    && mkdir -p /var/lib/preftune \
    && chown 10001:0 /var/lib/preftune \
    && chmod 0770 /var/lib/preftune

LABEL org.opencontainers.image.title="preftune" \
      org.opencontainers.image.description="Changes which behaviour a language model chooses, with human preferences and PPO: feedback service, pipeline steps and scheduler." \
      org.opencontainers.image.version="${PREFTUNE_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.documentation="https://example.invalid/preftune/docs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="preftune developers" \
      org.opencontainers.image.base.name="${PREFTUNE_BASE_IMAGE}"

USER 10001:10001
WORKDIR /var/lib/preftune
EXPOSE 8080
# Kubernetes probes /healthz and /readyz (see the Helm chart); no Docker HEALTHCHECK, because the
# same image also runs batch steps that serve no HTTP.
ENTRYPOINT ["preftune"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
