# skyfed in a container: one image runs `skyfed server` or `skyfed client`.
#
#   docker build --target cpu  -t skyfed:cpu  .     # PyTorch CPU wheel (the default target)
#   docker build --target cuda -t skyfed:cuda .     # official CUDA runtime base + PyTorch CUDA wheel
#   docker run --rm skyfed:cpu                      # prints `skyfed --help`
#   docker run --rm -p 7443:7443 -v "$PWD/certs:/run/secrets/skyfed:ro" -v "$PWD/runs:/runs" skyfed:cpu \
#       server --preset smoke --listen 0.0.0.0:7443 --out /runs/demo
#
# No secrets are built in: certificates and tokens are mounted files (/run/secrets/skyfed)
# or environment variables (SKYFED_TOKEN, SKYFED_TOKEN_FILE, SKYFED_TOKENS_FILE, SKYFED_TLS_*),
# read when the container starts. docs/deployment.md, section "Container".

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- the skyfed wheel
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- CUDA target
FROM ${CUDA_IMAGE} AS cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG SKYFED_EXTRAS=ops
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/skyfed \
    PATH=/opt/skyfed/bin:$PATH \
    SKYFED_CACHE=/home/skyfed/.cache/skyfed
# The distribution's python3 (3.12 on Ubuntu 24.04); its patch releases come with the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/skyfed
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir "$(echo /wheels/skyfed-*.whl)[${SKYFED_EXTRAS}]" \
    && rm -rf /wheels \
    && groupadd --gid 10001 skyfed \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin skyfed \
    && mkdir -p /data /runs \
    && chown 10001:10001 /data /runs
USER 10001:10001
WORKDIR /home/skyfed
# 7443: the federation (gRPC); 9090: --metrics-port (Prometheus /metrics and the status page)
EXPOSE 7443 9090
ENTRYPOINT ["skyfed"]
CMD ["--help"]

# ---------------------------------------------------------------- CPU target (the default: last stage)
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SKYFED_EXTRAS=ops
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SKYFED_CACHE=/home/skyfed/.cache/skyfed
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir "$(echo /wheels/skyfed-*.whl)[${SKYFED_EXTRAS}]" \
    && rm -rf /wheels \
    && groupadd --gid 10001 skyfed \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin skyfed \
    && mkdir -p /data /runs \
    && chown 10001:10001 /data /runs
USER 10001:10001
WORKDIR /home/skyfed
EXPOSE 7443 9090
ENTRYPOINT ["skyfed"]
CMD ["--help"]

