#!/usr/bin/env bash
# The self-check for a new GPU host, offline if need be: install (from a wheelhouse when given), bring
# the real stack up on the GPU (nginx, supervisord, two instances per engine), transcribe JFK through
# nginx, read each instance's GPU, dtype and memory and NVML's figures on /metrics, time spawn to
# ready, and measure dynamic batching (max_batch 8 vs 1, float16) on random weights of
# whisper-large-v3's shape. One JSON report; bench/gpu_check.py does the measuring.
#
#   scripts/gpu-check.sh [--wheelhouse DIR] [--nginx-deb FILE] [--report FILE] [--deadline SECONDS]
#                        [-- options for python -m bench.gpu_check, e.g. --engines transformers]
#
#   --wheelhouse DIR   install every Python package from DIR, no network (pip --no-index); DIR may
#                      also hold nginx_*.deb, unpacked in place when the host has no nginx
#   --nginx-deb FILE   that .deb, named directly
#   --report FILE      where the JSON report goes (default bench/results/gpu-check-<time>.json)
#   --deadline S       seconds for the checks themselves (default 360: with set-up from a wheelhouse, the whole run fits in 8 minutes)
#   --system-site-packages   a new .venv uses the image's own torch, transformers, nvidia-ml-py,
#                      so the wheelhouse need hold only the rest
#
# Make a wheelhouse on a machine with internet, for the GPU host's Python (3.11, x86_64):
#   pip download -d wheelhouse setuptools wheel 'torch==2.13.0' '.[transformers,gpu]'
#   apt-get download nginx && mv nginx_*.deb wheelhouse/     # only if the GPU host has no nginx
#
# Exit codes: 0 every check passed; 1 a check failed (see the report); 2 set-up failed (no report);
# 3 no GPU on this host: nothing was run.
set -uo pipefail
cd "$(dirname "$0")/.."

EXIT_FAILED=1 EXIT_SETUP=2 EXIT_NO_GPU=3
wheelhouse="" nginx_deb="" report="" deadline=360 system=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheelhouse=$(cd "$2" && pwd) || exit $EXIT_SETUP; shift 2 ;;
    --nginx-deb) nginx_deb=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    --deadline) deadline=$2; shift 2 ;;
    --system-site-packages) system=--system-site-packages; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit $EXIT_SETUP ;;
  esac
done
say() { printf '[gpu-check] %s\n' "$*"; }

# 1. A GPU, or nothing to check. The driver answers through nvidia-smi or lists its GPUs in /proc.
gpus=$(nvidia-smi -L 2>/dev/null)
if [ -z "$gpus" ] && ! ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1; then
  say "no GPU: no NVIDIA driver answers on this host (nvidia-smi -L, /proc/driver/nvidia/gpus); nothing checked"
  exit $EXIT_NO_GPU
fi
say "GPUs: ${gpus:-listed in /proc/driver/nvidia/gpus}"

# 2. nginx: the system's, else unpacked in place from a .deb.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  [ -n "$nginx_deb" ] || nginx_deb=$(ls "${wheelhouse:-/nonexistent}"/nginx*.deb 2>/dev/null | head -n 1)
  if [ -z "$nginx_deb" ]; then
    say "no nginx on this host and no nginx .deb given (--nginx-deb, or one in the wheelhouse)"
    exit $EXIT_SETUP
  fi
  root=$PWD/.gpu-check/nginx
  rm -rf "$root" && mkdir -p "$root" && dpkg-deb -x "$nginx_deb" "$root" || exit $EXIT_SETUP
  export PATH="$root/usr/sbin:$PATH"
  say "nginx unpacked from $nginx_deb: $("$root/usr/sbin/nginx" -v 2>&1)"
fi

# 3. The virtualenv: both engines, the GPU libraries, no test tools; offline from the wheelhouse.
scripts/setup.sh --gpu --no-test $system ${wheelhouse:+--wheelhouse "$wheelhouse"} || { say "set-up failed"; exit $EXIT_SETUP; }

# 4. The checks, bounded: the harness stops starting work at its deadline, the timeout kills it after.
args=(--deadline "$deadline")
[ -n "$report" ] && args+=(--report "$report")
timeout --kill-after=20 $((deadline + 60)) .venv/bin/python -m bench.gpu_check "${args[@]}" "$@"
rc=$?
[ $rc -eq 0 ] && exit 0
[ $rc -eq 1 ] && exit $EXIT_FAILED
say "the checks ended abnormally (exit $rc)"
exit $EXIT_FAILED
