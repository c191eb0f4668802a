#!/usr/bin/env bash
# The self-check for a new GPU host, offline if need be: install (from a wheelhouse, or over a GPU
# image's own packages from a small carried set), bring the real stack up on the GPU (nginx,
# supervisord, two instances per engine), transcribe JFK through nginx, read each instance's GPU,
# dtype and memory and NVML's figures on /metrics, time spawn to ready, and measure dynamic batching
# (max_batch 8 vs 1) on random weights of whisper-large-v3's shape (float16) and of Qwen3-ASR-1.7B's
# (bfloat16). One JSON report; app/selfcheck/check.py does the measuring.
#
#   scripts/gpu-check.sh [--wheelhouse DIR | --carried DIR] [--nginx-deb FILE] [--report FILE]
#                        [--deadline SECONDS] [--cpu-rehearsal]
#                        [-- options for python -m app.selfcheck, e.g. --engines transformers]
#
# The vllm engine's stack runs from its own environment: .venv-vllm (scripts/setup.sh --engine vllm,
# CUDA wheels on a GPU host) or the one $ASR_ENGINE_ENVIRONMENT names (a GPU image with vLLM); where
# neither has vLLM the report skips it and says so.
#
#   --wheelhouse DIR   install every Python package from DIR, no network (pip --no-index); DIR may
#                      also hold nginx_*.deb, unpacked in place when the host has no nginx
#   --carried DIR      a GPU image with its own python3, torch and transformers (python3 -m venv
#                      --without-pip, a .pth adding the image's site-packages; $ASR_IMAGE_PYTHON picks
#                      another python): the few wheels it lacks from DIR/wheels, nginx from DIR/debs
#                      (and its libraries, if the host lacks them), the service itself with --no-deps.
#                      DIR is what scripts/gpu-carry.sh makes (.gpu-carry). The venv is .gpu-check/venv;
#                      .venv is left alone. Engines whose packages are not carried (ctranslate2) and
#                      checks that need the embedded model are skipped, and the report says so.
#   --nginx-deb FILE   that .deb, named directly: used even where the host has an nginx
#   --report FILE      where the JSON report goes (default $OUT/gpu-check.json when $OUT is set, else
#                      gpu-check-<time>.json in the current directory)
#   --deadline S       seconds for the checks themselves (default 360: with set-up from a wheelhouse, the whole run fits in 8 minutes)
#   --system-site-packages   a new .venv uses the image's own torch, transformers, nvidia-ml-py,
#                      so the wheelhouse need hold only the rest
#   --cpu-rehearsal    on a host without a GPU: the same steps on the CPU with tiny random models
#                      (--device cpu --shape test --qwen-shape tiny --clips 3), to prove the set-up
#                      and the harness before a GPU is lent; its report says device "cpu"
#
# Make a wheelhouse on a machine with internet, for the GPU host's Python (3.11, x86_64):
#   pip download -d wheelhouse --extra-index-url https://download.pytorch.org/whl/cu126 \
#       setuptools wheel 'torch==2.13.0+cu126' '.[transformers,gpu]'
#   (torch's CUDA 12 build: PyPI's is CUDA 13, whose cuDNN wheel overwrites CTranslate2's; see setup.sh)
#   apt-get download nginx && mv nginx_*.deb wheelhouse/     # only if the GPU host has no nginx
# Or, for a GPU image (python 3.12 with torch and transformers): scripts/gpu-carry.sh, then there
#   scripts/gpu-check.sh --carried .gpu-carry
#
# Exit codes: 0 every check passed; 1 a check failed (see the report); 2 set-up failed (no report);
# 3 no GPU on this host: nothing was run.
set -uo pipefail
cd "$(dirname "$0")/.."

EXIT_FAILED=1 EXIT_SETUP=2 EXIT_NO_GPU=3
wheelhouse="" carried="" nginx_deb="" report="" deadline=360 system="" rehearsal=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheelhouse=$(cd "$2" && pwd) || exit $EXIT_SETUP; shift 2 ;;
    --carried) carried=$(cd "$2" && pwd) || exit $EXIT_SETUP; shift 2 ;;
    --cpu-rehearsal) rehearsal=1; shift ;;
    --nginx-deb) nginx_deb=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    --deadline) deadline=$2; shift 2 ;;
    --system-site-packages) system=--system-site-packages; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit $EXIT_SETUP ;;
  esac
done
say() { printf '[gpu-check] %s\n' "$*"; }

# 1. A GPU, or nothing to check. The driver answers through nvidia-smi or lists its GPUs in /proc.
gpus=$(nvidia-smi -L 2>/dev/null)
if [ -z "$gpus" ] && ! ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1; then
  if [ $rehearsal = 0 ]; then
    say "no GPU: no NVIDIA driver answers on this host (nvidia-smi -L, /proc/driver/nvidia/gpus); nothing checked"
    exit $EXIT_NO_GPU
  fi
  say "no GPU: a CPU rehearsal (tiny random models on the CPU)"
else
  say "GPUs: ${gpus:-listed in /proc/driver/nvidia/gpus}"
fi
[ -n "$report" ] || [ -z "${OUT:-}" ] || report=$OUT/gpu-check.json
named_deb=$nginx_deb
[ -z "$carried" ] || [ -n "$nginx_deb" ] || nginx_deb=$(ls "$carried"/debs/nginx_*.deb 2>/dev/null | head -n 1)

# nginx: the system's, else unpacked in place from a .deb (always, when --nginx-deb names one).
if [ -n "$named_deb" ] || { ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; }; then
  [ -n "$nginx_deb" ] || nginx_deb=$(ls "${wheelhouse:-/nonexistent}"/nginx*.deb 2>/dev/null | head -n 1)
  if [ -z "$nginx_deb" ]; then
    say "no nginx on this host and no nginx .deb given (--nginx-deb, or one in the wheelhouse)"
    exit $EXIT_SETUP
  fi
  root=$PWD/.gpu-check/nginx
  rm -rf "$root" && mkdir -p "$root/bin" && dpkg-deb -x "$nginx_deb" "$root" || exit $EXIT_SETUP
  # Its libraries (PCRE2, OpenSSL, zlib, libcrypt) from the .debs beside it, for this binary alone,
  # only where the host lacks one: a wrapper sets LD_LIBRARY_PATH for nginx and nothing else.
  libs=""
  if ldd "$root/usr/sbin/nginx" | grep -q 'not found'; then
    for deb in "$(dirname "$nginx_deb")"/lib*.deb "$(dirname "$nginx_deb")"/zlib*.deb; do
      [ -f "$deb" ] && dpkg-deb -x "$deb" "$root"
    done
    libs="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
  fi
  # -e stderr: the compiled-in /var/log/nginx/error.log need not exist (no nginx-common here).
  printf '#!/bin/sh\n%sexec "%s" -e stderr "$@"\n' "${libs:+LD_LIBRARY_PATH=$libs }" "$root/usr/sbin/nginx" > "$root/bin/nginx"
  chmod +x "$root/bin/nginx"
  export PATH="$root/bin:$PATH"
  say "nginx unpacked from $nginx_deb${libs:+ with its libraries}: $(nginx -v 2>&1)"
fi

# 3. The virtualenv: both engines, the GPU libraries, no test tools; offline from the wheelhouse. Or,
#    over a GPU image: its own packages through a .pth, the carried wheels, the service without deps.
python=.venv/bin/python
args=(--deadline "$deadline")
if [ -n "$carried" ]; then
  image=${ASR_IMAGE_PYTHON:-python3}
  venv=$PWD/.gpu-check/venv python=$PWD/.gpu-check/venv/bin/python
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
  {
    "$image" -m venv --clear --without-pip "$venv" &&
    "$image" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
      > "$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_gpu_image.pth" &&
    "$python" -m pip install -q --no-deps --no-compile "$carried"/wheels/*.whl &&
    "$python" -m pip install -q --no-deps --no-build-isolation -e .
  } || { say "set-up over the image's python ($image) failed"; exit $EXIT_SETUP; }
  say "installed over $("$image" -c 'import sys; print(sys.prefix)'): torch $("$python" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1), transformers $("$python" -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -n 1)"
  [ -f "$carried/whisper-tokenizer.json.gz" ] && args+=(--whisper-tokenizer "$carried/whisper-tokenizer.json.gz")
else
  scripts/setup.sh --gpu --no-test $system ${wheelhouse:+--wheelhouse "$wheelhouse"} || { say "set-up failed"; exit $EXIT_SETUP; }
fi

# 4. The checks, bounded: the harness stops starting work at its deadline, the timeout kills it after.
[ -n "$report" ] && args+=(--report "$report")
[ $rehearsal = 1 ] && args+=(--device cpu --shape test --qwen-shape tiny --clips 3 --clip-seconds 1)
timeout --kill-after=20 $((deadline + 60)) "$python" -m app.selfcheck "${args[@]}" "$@"
rc=$?
[ $rc -eq 0 ] && exit 0
[ $rc -eq 1 ] && exit $EXIT_FAILED
say "the checks ended abnormally (exit $rc)"
exit $EXIT_FAILED
