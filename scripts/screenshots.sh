#!/usr/bin/env bash
# Retake the docs' screenshots (docs/screenshots/*.png) with the browser tests: the try-it page
# after a file, after a microphone recording and with live captions, and Swagger UI after "Try it out"
# on POST /asr.
set -euo pipefail
cd "$(dirname "$0")/.."
ASR_SCREENSHOTS=docs/screenshots exec .venv/bin/python -m pytest tests/test_pages.py -q "$@"
