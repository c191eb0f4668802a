"""Run in the vllm environment (.venv-vllm) by tests/test_vllm_engine.py: load the vllm engine on a
model and decode what the test asks, writing the results as JSON. The tests themselves run in .venv,
whose transformers is the one the transformers engine is tested with; vLLM pins an older one.

    .venv-vllm/bin/python tests/vllm_decode.py MODEL_DIR REQUEST.json RESULT.json

REQUEST: {"clips": [{"audio": "x.npy", "language": "en"|null, "prompt": "", "budget": 66}, ...]}.
RESULT: {"tokens": [[...], ...], "transcripts": [{"text", "language", "segments"}, ...],
"detected": [[code, probability], ...], "refused_beams": message}: every clip's greedy tokens from one
generate call, its transcript through transcribe_batch, and detection on all of them.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from app.engines import load_engine
from app.engines.base import DecodeOptions


def main(model: str, request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    engine = load_engine("vllm", model, "cpu", chunk_seconds=20)
    clips = request["clips"]
    audios = [np.load(c["audio"]) for c in clips]
    options = [DecodeOptions(beam_size=1, language=c["language"], initial_prompt=c["prompt"]) for c in clips]
    tokens = engine.generate(audios, options, [c["budget"] for c in clips])
    transcripts = engine.transcribe_batch(audios, options)
    try:
        engine.transcribe(audios[0], DecodeOptions(beam_size=2))
        refused = ""
    except ValueError as e:
        refused = str(e)
    result = {"tokens": tokens,
              "transcripts": [{"text": t.text, "language": t.language,
                               "segments": [[s.start, s.end, s.text] for s in t.segments]} for t in transcripts],
              "detected": [list(d) for d in engine.detect_language(audios)],
              "refused_beams": refused}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
