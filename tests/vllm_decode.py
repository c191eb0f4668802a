"""Run in the vllm environment (.venv-vllm) by tests/test_vllm_engine.py: load the vllm engine on a
model and decode what the test asks, writing the results as JSON. The tests themselves run in .venv,
whose transformers is the one the transformers engine is tested with; vLLM pins an older one.

    .venv-vllm/bin/python tests/vllm_decode.py MODEL_DIR REQUEST.json RESULT.json

REQUEST: {"clips": [{"audio": "x.npy", "language": "en"|null, "prompt": "", "budget": 66}, ...]}.
RESULT: {"tokens": [[...], ...], "transcripts": [{"text", "language", "segments"}, ...],
"detected": [[code, probability], ...], "refused_beams": message, "queued": {"transcripts", "detected",
"continuous"}}: every clip's greedy tokens from one generate call, its transcript through
transcribe_batch, and detection on all of them; then the same transcripts and detections through the
instance's queue, every job submitted at once and begun one by one (continuous batching), with a
transcription asking for beams among them.

    .venv-vllm/bin/python tests/vllm_decode.py arrivals MODEL_DIR RESULT.json

An untaught model, which never ends and decodes up to each clip's token budget: a long clip submitted
to the queue, then a short one once the long one decodes. RESULT: {"finished": [which, ...] in the
order they ended}.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import time

from app.engines import load_engine
from app.engines.base import DecodeOptions
from app.runtime.queue import InferenceQueue


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
    queue = InferenceQueue(max_pending=64, max_batch=64)
    queue.start(engine)
    try:
        transcribing = [queue.submit(a, o) for a, o in zip(audios, options)]
        beams = queue.submit(audios[0], DecodeOptions(beam_size=2))
        detecting = [queue.submit_language_detection(a) for a in audios]
        queued = [f.result(timeout=600) for f in transcribing]
        result["queued"] = {"transcripts": [{"text": t.text, "language": t.language,
                                             "segments": [[s.start, s.end, s.text] for s in t.segments]}
                                            for t in queued],
                            "detected": [list(f.result(timeout=600)) for f in detecting],
                            "refused_beams": str(beams.exception(timeout=600)),
                            "continuous": engine.continuous}
    finally:
        queue.stop()
    with open(result_path, "w") as f:
        json.dump(result, f)


def arrivals(model: str, result_path: str) -> None:
    engine = load_engine("vllm", model, "cpu", chunk_seconds=30)
    rng = np.random.default_rng(1)
    clips = {"long": (0.1 * rng.standard_normal(25 * 16000)).astype(np.float32),
             "short": (0.1 * rng.standard_normal(16000)).astype(np.float32)}
    options = DecodeOptions(beam_size=1, language="en")
    queue = InferenceQueue(max_pending=8, max_batch=8)
    queue.start(engine)
    finished: list[str] = []
    try:
        long = queue.submit(clips["long"], options)
        long.add_done_callback(lambda _: finished.append("long"))
        deadline = time.monotonic() + 60
        while queue.in_flight == 0 and time.monotonic() < deadline:   # until the long one decodes
            time.sleep(0.01)
        time.sleep(0.2)
        short = queue.submit(clips["short"], options)
        short.add_done_callback(lambda _: finished.append("short"))
        long.result(timeout=600), short.result(timeout=600)
    finally:
        queue.stop()
    with open(result_path, "w") as f:
        json.dump({"finished": finished}, f)


if __name__ == "__main__":
    if sys.argv[1] == "arrivals":
        arrivals(*sys.argv[2:4])
    else:
        main(*sys.argv[1:4])
