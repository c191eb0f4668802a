"""``python -m bench chunk-priming``: chunks primed with the text before them, against the whole-file decode.

Would priming each chunk with the text before it bring chunk-parallel decoding what conditioning on
previous text brings faster-whisper's whole-file decode?
Each recording (chosen as ``bench long-accuracy`` chooses them: ``--audio``, ``--only``, ``--seconds``,
``--lead-silence``, ``--rearranged``) is cut where the service cuts it (``longform.split``), each chunk is decoded by
faster-whisper's ``transcribe`` (the served model and compute type, beam 5, the service's
temperature ladder and thresholds, no VAD) primed as each of ``WAYS`` says, and the chunks'
transcripts are joined as the service joins them (``chunking.join``). Reports every way's WER per
recording and, over the recordings, its mean difference from faster-whisper's defaults on the whole
file, with the standard error, and on how many recordings it is within 0.5 points. Accuracy only: the
decodes run side by side in worker processes of one thread each, and no time is measured. Results:
``bench/results/chunk-priming-<timestamp>/`` (``summary.md``, ``results.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import REPO
from bench.bare import child_environment
from bench.long_accuracy import MAX_WER_GAP_PP, choosing, chosen_or_status, spread
from app.engines.base import Transcript
from app.engines.ctranslate2_engine import PROMPT_RESET_TEMPERATURE
from app.selfcheck.wer import word_error_rate

WAYS = {
    "whole": "faster-whisper's defaults on the whole file (long-accuracy's (a))",
    "none": "each chunk alone, as the service decodes them",
    "lag2": "each chunk primed with the tokens of the chunk two before (decoded by then on a two-lane pool)",
    "upto2": "each chunk primed with the tokens of every chunk up to the one two before",
    "lag1": "each chunk primed with the tokens of the chunk just before (one after the other: no parallelism)",
    "halves": "faster-whisper's defaults on each half of the file, cut in the pause nearest the middle",
    "quarters": "faster-whisper's defaults on each quarter of the file, cut in the pauses nearest the quarters",
    "chain2": "the service's chunks in two spans cut as the halves, each chunk primed with the text of its span's chunks before it",
    "chain4": "the same in four spans cut as the quarters",
}
SPANS = {"halves": 2, "quarters": 4}   # the ways that decode spans whole, and how many
CHAINS = {"chain2": 2, "chain4": 4}    # the ways that decode spans chunk after chunk, and how many
BASELINE = "whole"


def prompt(way: str, tokens: list[list[int]], index: int) -> list[int] | None:
    """The tokens chunk ``index`` is primed with, from ``tokens`` (each earlier chunk's, timestamps
    included, as faster-whisper's own conditioning keeps them); None where there is nothing to prime with."""
    if way in ("lag1", "lag2"):
        lag = int(way[-1])
        return list(tokens[index - lag]) if index >= lag else None
    if way == "upto2":
        return [t for chunk in tokens[:index - 1] for t in chunk] if index >= 2 else None
    return None


def conditioned_prompt(initial_prompt: str, before: Sequence[Transcript]) -> str:
    """The chain ways' prompt for a chunk decoded after ``before`` (the chunks before it in its span, in
    order), as text, the way a service would pass it as ``initial_prompt``: the initial prompt and those
    chunks' text, from after the last chunk decoded hotter than ``PROMPT_RESET_TEMPERATURE`` (as
    faster-whisper resets its prompt). faster-whisper keeps the prompt's last 223 tokens."""
    texts = [initial_prompt]
    for transcript in before:
        if any(s.temperature > PROMPT_RESET_TEMPERATURE for s in transcript.segments):
            texts = []
        else:
            texts.append(transcript.text)
    return " ".join(t.strip() for t in texts if t.strip())


def span_cuts(chunks, length: int, spans: int) -> list[int]:
    """Where to cut ``length`` samples into ``spans`` spans: for each k/spans of the length, the cut
    between two chunks nearest to it that falls in a pause (not inside speech, where chunks overlap),
    each cut used once."""
    pauses = [c.end for c, after in zip(chunks, chunks[1:]) if c.end <= after.start]
    cuts: list[int] = []
    for k in range(1, spans):
        left = [p for p in pauses if p not in cuts]
        if not left:
            raise ValueError(f"too few cuts in pauses to make {spans} spans")
        cuts.append(min(left, key=lambda cut: abs(cut - k * length / spans)))
    return sorted(cuts)


def decode(model, samples: np.ndarray, way: str, chunk_seconds: float = 30.0) -> str:
    """The recording's text decoded ``way`` (one of ``WAYS``), cut into chunks of ``chunk_seconds`` at most."""
    import ctranslate2

    from app.audio import chunking, longform
    from app.engines import fallback
    from app.engines.base import SAMPLE_RATE, DecodeOptions, Segment
    from app.engines.ctranslate2_engine import _transcript, _words

    ctranslate2.set_random_seed(0)       # the temperature fallback samples: the same draws every run
    if way == BASELINE:
        return " ".join(s.text.strip() for s in model.transcribe(samples)[0])
    chunks = longform.split(samples, chunk_seconds, times_words=True)
    if way in SPANS:
        edges = [0, *span_cuts(chunks, len(samples), SPANS[way]), len(samples)]
        return " ".join(s.text.strip() for start, end in zip(edges, edges[1:])
                        for s in model.transcribe(samples[start:end])[0])
    options = DecodeOptions()
    tokens: list[list[int]] = []
    transcripts = []
    firsts = {0}                # where each span's first chunk is
    if way in CHAINS:
        firsts |= {next(i for i, c in enumerate(chunks) if c.start >= cut)
                   for cut in span_cuts(chunks, len(samples), CHAINS[way])}
    for index, chunk in enumerate(chunks):
        span = max(i for i in firsts if i <= index)
        segments, info = model.transcribe(
            samples[chunk.start:chunk.end], beam_size=options.beam_size, best_of=fallback.BEST_OF,
            temperature=list(fallback.temperatures(0.0, True)),
            compression_ratio_threshold=fallback.COMPRESSION_RATIO_THRESHOLD,
            log_prob_threshold=fallback.LOG_PROB_THRESHOLD, no_speech_threshold=fallback.NO_SPEECH_THRESHOLD,
            initial_prompt=(conditioned_prompt("", transcripts[span:index]) or None) if way in CHAINS
            else prompt(way, tokens, index),
            word_timestamps=longform.chunk_options(options, chunks, index).word_timestamps, vad_filter=False)
        segments = list(segments)
        tokens.append([t for s in segments for t in s.tokens])
        parts = [Segment(round(s.start, 3), round(s.end, 3), s.text.strip(), _words(s.words), s.temperature)
                 for s in segments]
        transcripts.append(_transcript(parts, info.language, info.language_probability, chunk.end - chunk.start))
    return chunking.join(transcripts, chunks, len(samples) / SAMPLE_RATE).text


_model = None


def _load(model_dir: str, compute_type: str) -> None:
    global _model
    from faster_whisper import WhisperModel

    _model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=1)


def _work(task: tuple[str, bytes, str, float]) -> tuple[str, str, str]:
    import soundfile

    name, data, way, chunk_seconds = task
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    return name, way, decode(_model, samples, way, chunk_seconds)


def run(recordings, ways: list[str], out: Path, workers: int, log=print) -> dict:
    from app.config import load_settings
    from app.engines.ctranslate2_engine import resolved_compute_type
    from app.engines.models import display_name, resolve_model

    settings = load_settings(env={**os.environ, "ASR_ENGINE": "ctranslate2", "ASR_DEVICE": "cpu"})
    compute_type = resolved_compute_type("cpu", settings.compute_type)
    model_dir = resolve_model("ctranslate2", settings.model, settings.model_cache)
    references = {r.name: r.reference for r in recordings}
    rows = []
    tasks = [(r.name, r.data, way, settings.chunk_seconds) for r in recordings for way in ways]
    with child_environment(OMP_NUM_THREADS="1"):   # each worker decodes as an instance of one core does
        pool = mp.get_context("spawn").Pool(workers, initializer=_load, initargs=(model_dir, compute_type))
    with pool:
        for name, way, text in pool.imap_unordered(_work, tasks):
            rows.append({"recording": name, "way": way, "wer": word_error_rate(references[name], text), "text": text})
            log(f"{name} {way}: WER {100 * rows[-1]['wer']:.2f} %")
        pool.close()
        pool.join()
    result = {"model": display_name(settings.model), "compute_type": compute_type, "ways": ways,
              "recordings": list(references), "rows": rows, "compared": compare(rows, ways)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(result))
    return result


def compare(rows: list[dict], ways: list[str]) -> dict:
    """Per way other than the baseline, over the recordings decoded both ways: how its WER's difference
    from the baseline's, in points, spreads (``long_accuracy.spread``), against ``MAX_WER_GAP_PP``."""
    wer = {(r["recording"], r["way"]): 100 * r["wer"] for r in rows}
    names = list(dict.fromkeys(r["recording"] for r in rows))
    out = {}
    for way in ways:
        gaps = [wer[n, way] - wer[n, BASELINE] for n in names if (n, way) in wer and (n, BASELINE) in wer]
        if way != BASELINE and gaps:
            out[way] = spread(gaps, MAX_WER_GAP_PP)
    return out


def markdown(result: dict) -> str:
    ways = result["ways"]
    wer = {(r["recording"], r["way"]): 100 * r["wer"] for r in result["rows"]}
    lines = [f"{result['model']} {result['compute_type']}; WER % per recording:", "",
             "| recording | " + " | ".join(ways) + " |", "| --- |" + " ---: |" * len(ways)]
    for name in result["recordings"]:
        lines.append(f"| {name} | " + " | ".join(f"{wer[name, w]:.2f}" if (name, w) in wer else "-" for w in ways) + " |")
    lines += ["", f"| way | points above {BASELINE} (mean) | standard error | within {MAX_WER_GAP_PP} |",
              "| --- | ---: | ---: | ---: |"]
    for way, c in result["compared"].items():
        error = "-" if c["standard_error"] is None else f"{c['standard_error']:.2f}"
        lines.append(f"| {way}: {WAYS[way]} | {c['mean']:+.2f} | {error} | {c['within']} of {c['recordings']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench chunk-priming", description=__doc__.split("\n")[0])
    choosing(parser)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding processes of one thread each (default: one per usable core)")
    parser.add_argument("--out", help="results folder (default: bench/results/chunk-priming-<timestamp>)")
    args = parser.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    if unknown := [w for w in ways if w not in WAYS]:
        parser.error(f"unknown ways: {', '.join(unknown)}")
    if BASELINE not in ways:
        ways.insert(0, BASELINE)
    if len(args.lead_silence) > 1:
        parser.error("one --lead-silence value: each recording is compared by its name")
    recordings = chosen_or_status(args, "chunk-priming")
    if isinstance(recordings, int):
        return recordings
    out = Path(args.out or REPO / "bench" / "results" / time.strftime("chunk-priming-%Y%m%d-%H%M%S"))
    run(recordings, ways, out, max(1, args.workers), log=lambda line: print(line, flush=True))
    print()
    print((out / "summary.md").read_text())
    print(f"results: {out} (summary.md, results.json)")
    return 0


if __name__ == "__main__":
    from bench import stop_on_sigterm

    stop_on_sigterm()
    sys.exit(main())
