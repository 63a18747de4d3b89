# syntax=docker/dockerfile:1.7
#
# One preftune image for every component: the feedback service (`preftune serve`), the
# Kubeflow pipeline steps (collect, check-fit, train-reward, ppo, evaluate, promote), the
# schedule hook Job and the optional MLflow tracking server of the Helm chart.
#
#   CPU (default):  docker build -t REGISTRY/preftune:0.1.0 .
#   GPU (ppo step): docker build --build-arg VARIANT=cuda -t REGISTRY/preftune:0.1.0-cuda .
#
# The GPU variant starts from an NVIDIA CUDA runtime base, installs the CUDA build of torch and
# the `gpu` extra (DeepSpeed, with its fused Adam ops compiled in a separate CUDA devel stage so
# that the final image carries no compiler). BuildKit builds only the stages the chosen VARIANT
# needs.

# Pinned bases: change these deliberately (and rebuild), never float on `latest`.
ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_RELEASE=bookworm
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_RELEASE=ubuntu24.04
# cpu | cuda
ARG VARIANT=cpu
# torch from the PyTorch index of the variant; must lie in pyproject's torch range.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED_VERSION=0.19.8
# The package version (pyproject.toml); the wheel name and the OCI version label use it.
ARG PREFTUNE_VERSION=0.1.0

# ---------------------------------------------------------------------------------------------
# builder: build the preftune wheel from the source tree (pure Python, no compiler needed).
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS builder
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
# deepspeed-builder (VARIANT=cuda only): DeepSpeed compiles its CUDA ops just in time by default,
# which needs nvcc and a C++ compiler at run time. Prebuild the ops the ppo step uses into a
# wheel here, in the CUDA devel image, so that the runtime image stays compiler-free.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_RELEASE} AS deepspeed-builder
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
ARG DEEPSPEED_VERSION
# Ampere, Ada, Hopper and Blackwell data-centre GPUs.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's own python3 build of the release is the point here, not a version pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/build-venv
ENV PATH=/opt/build-venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX_URL}" \
    && pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 packaging==26.3 ninja==1.13.2 \
    && DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
       pip wheel --no-deps --no-build-isolation --wheel-dir /dist "deepspeed==${DEEPSPEED_VERSION}"

# ---------------------------------------------------------------------------------------------
# base-cpu: the slim Python base, a virtual environment and the CPU build of torch (a fraction
# of the size of the CUDA one).
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS base-cpu
ARG PYTHON_VERSION
ARG DEBIAN_RELEASE
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
ENV PREFTUNE_IMAGE_VARIANT=cpu \
    PREFTUNE_BASE_IMAGE=python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} \
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

# base-cuda: the NVIDIA CUDA runtime base (the driver comes from the node), Ubuntu's Python,
# the CUDA build of torch and DeepSpeed with its prebuilt ops (the wheel is bind-mounted from
# deepspeed-builder, never copied into a layer).
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_RELEASE} AS base-cuda
ARG CUDA_VERSION
ARG UBUNTU_RELEASE
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive \
    PREFTUNE_IMAGE_VARIANT=cuda \
    PREFTUNE_BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_RELEASE} \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# hadolint ignore=DL3013
RUN --mount=type=bind,from=deepspeed-builder,source=/dist,target=/tmp/deepspeed \
    pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX_URL}" \
    && pip install --no-cache-dir /tmp/deepspeed/deepspeed-*.whl

# ---------------------------------------------------------------------------------------------
# runtime: the image that ships. No compiler, no pip cache, no build tree, no secrets.
# (base-${VARIANT} is one of the two stages above, each pinned by version.)
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
# layer. The CUDA variant adds the `gpu` extra, already satisfied by the DeepSpeed wheel above.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    set -eu; \
    wheel="$(ls /tmp/dist/preftune-${PREFTUNE_VERSION}-*.whl)"; \
    if [ "${PREFTUNE_IMAGE_VARIANT}" = "cuda" ]; then \
      extras="[gpu]"; pip install --no-cache-dir "${wheel}${extras}"; \
    else \
      pip install --no-cache-dir --no-deps "${wheel}"; pip check; \
    fi; \
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
