#!/usr/bin/env bash
# Set up (when needed) and run the whole test suite against real nginx, supervisord, gunicorn and models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-test-tools
exec .venv/bin/python -m pytest "$@"
