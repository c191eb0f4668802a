"""``python -m bench run [--quick] ...``: measure, print the summary, write bench/results/<timestamp>/."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.run import Plan, run_benchmark


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["long"]:  # long-file latency: its own options (bench/long.py)
        from bench import long

        return long.main(argv[1:])
    if argv[:1] == ["engines"]:  # the vllm and qwen3-asr engines side by side (bench/engines.py)
        from bench import engines

        return engines.main(argv[1:])
    if argv[:1] == ["long-accuracy"]:  # WER and time on long recordings: its own options (bench/long_accuracy.py)
        from bench import long_accuracy

        return long_accuracy.main(argv[1:])
    if argv[:1] == ["chunk-priming"]:  # chunks primed with the text before them (bench/chunk_priming.py)
        from bench import chunk_priming

        return chunk_priming.main(argv[1:])
    if argv[:1] == ["streaming"]:  # live transcription under load: its own options (bench/streaming.py)
        from bench import streaming

        return streaming.main(argv[1:])
    args = _parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "quick", "no_progress", "json")}
    if "out" in options:
        options["out"] = Path(options["out"])
    options["progress"] = not args.no_progress
    plan = Plan.quick(**options) if args.quick else Plan(**options)
    result, out = run_benchmark(plan)
    print((out / "summary.md").read_text())
    for note in result["meta"]["notes"]:
        print(f"note: {note}")
    print(f"results: {out}  ({', '.join(result['files'])})")
    if args.json:
        json.dump(result["ratios"], sys.stdout, indent=2)
        print()
    errors = sum(r["errors"] for r in result["runs"])
    return 1 if errors else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="bring up services with asrctl, load them, compare with the bare engine")
    run.add_argument("--quick", action="store_true", help="smoke run: 3 short clips, 1 instance, concurrency 1-2")
    run.add_argument("--clips", dest="clips_dir", help="folder of audio files (default: the English set-A clips of ../shared/audio, else sentences espeak-ng speaks)")
    run.add_argument("--limit", dest="clip_limit", type=int, help="use only the N shortest clips")
    run.add_argument("--concurrency", type=_ints, help="closed-loop sweep on one all-core instance, e.g. 2,4,8 "
                                                       "(concurrency 1 is always measured)")
    run.add_argument("--rates", type=_floats, help="open-loop runs at these request rates (per second), e.g. 1,2")
    run.add_argument("--instances", type=_ints, help="single-thread instance counts to compare, e.g. 1,2 (0 = none)")
    run.add_argument("--rounds", type=int, help="passes over the clips at concurrency 1 (default 2)")
    run.add_argument("--blocks", type=int, help="alternating served/bare blocks per comparison (default 2)")
    run.add_argument("--passes", type=int, help="passes over the clips per block (default 1)")
    run.add_argument("--max-seconds", dest="max_seconds", type=float,
                     help="no new work after this many seconds (default 720; quick 150)")
    run.add_argument("--engine")
    run.add_argument("--device", help="auto (default: cuda where NVML finds a GPU), cpu or cuda")
    run.add_argument("--model")
    run.add_argument("--compute-type", dest="compute_type")
    run.add_argument("--beam-size", dest="beam_size", type=int)
    run.add_argument("--max-batch", dest="max_batch", type=int, help="requests per engine call (0 = auto)")
    run.add_argument("--max-wait-ms", dest="max_wait_ms", type=float)
    run.add_argument("--max-queue", dest="max_queue", type=int)
    run.add_argument("--out", help="results folder (default: bench/results/<timestamp>)")
    run.add_argument("--keep-run-dirs", dest="keep_run_dirs", action="store_true", default=None,
                     help="keep the services' run directories (logs) instead of removing them")
    run.add_argument("--no-progress", dest="no_progress", action="store_true")
    run.add_argument("--json", action="store_true", default=None, help="also print the ratios as JSON")
    return parser


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip() and float(x) > 0]
