#!/usr/bin/env bash
# Set up (when needed) and run the whole test suite against real nginx, supervisord, gunicorn and models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-test-tools
# The vllm engine's tests run vLLM in its own environment, .venv-vllm (about 3 minutes, 4 GB).
scripts/setup.sh --engine vllm
exec .venv/bin/python -m pytest "$@"
