"""``python -m bench engines``: the vllm and the transformers (qwen3-asr) engines served side by side on
the same Qwen3-ASR weights, through nginx, at concurrency 1, 8 and 32: requests per second and p95.

Without a model (``--model``), both serve a Qwen3-ASR of the released layout and vocabulary with tiny
random layers (``app/selfcheck/random_qwen3_asr.py``, "tiny": heads of 32, the smallest vLLM's CPU
attention runs), built here in seconds. Random weights rarely stop early, so each request decodes
about its whole token budget on both engines alike: the figures compare the engines' machinery (vLLM's
scheduler and paged cache against transformers' batched ``generate``), not a model's accuracy. One
instance each, on all cores, one service at a time. vLLM is handed every waiting request; the
transformers engine runs at its default for the device (one request per call on a CPU) and with every
waiting request in one call too. Figures on a GPU are
what this benchmark exists for and have not been measured yet; the report says where it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from app.selfcheck.speech import load_clips
from bench.load import Uploads, run_load
from bench.machine import cpu_model
from bench.report import summarize_http
from bench.service import Service

ENGINES = ("qwen3-asr", "vllm")
CONCURRENCY = (1, 8, 32)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out or Path("bench/results") / f"engines-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    clips = load_clips(args.clips_dir, limit=args.limit)
    uploads = Uploads(clips)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        model = args.model or str(_tiny_model(Path(tmp) / "qwen3-asr-tiny"))
        for engine, max_batch in _configurations(args.engines, args.device, max(args.concurrency)):
            label = f"{engine} max_batch={max_batch}"
            service = Service(label, Path(tmp) / f"run-{engine}-{max_batch}", instances=1, cpu_threads=0,
                              flags=["--engine", engine, "--model", model, "--beam-size", "1",
                                     "--device", args.device, "--max-queue", str(max(args.concurrency))],
                              env={"VLLM_CPU_KVCACHE_SPACE": "1", "ASR_MAX_BATCH": str(max_batch)})
            try:
                service.up(timeout=900)
                for concurrency in args.concurrency:
                    count = max(args.requests, 2 * concurrency)
                    schedule = [clips[i % len(clips)] for i in range(count)]
                    records = run_load(service.url, uploads, schedule, f"{engine}-c{concurrency}",
                                       concurrency=concurrency, max_seconds=args.max_seconds)
                    row = summarize_http(f"{label} c={concurrency}", records, engine=engine, max_batch=max_batch,
                                         concurrency=concurrency)
                    rows.append(row)
                    print(_line(row), flush=True)
            finally:
                service.down()
    result = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "model": args.model or "random Qwen3-ASR, tiny layers (heads of 32)",
              "device": args.device, "clips": len(clips), "runs": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results: {out}")
    return 1 if any(r["errors"] for r in rows) else 0


def _configurations(engines: list[str], device: str, most: int) -> list[tuple[str, int]]:
    """(engine, max_batch) to measure: the transformers engine at its default for the device (1 request
    per call on a CPU, 8 on a GPU) and with every waiting request in one call, as vLLM is handed them."""
    from app.config import Settings

    out = []
    for engine in engines:
        default = Settings(engine=engine, max_queue=most).batch_size(device)
        out += [(engine, default)] + ([(engine, most)] if default != most else [])
    return out


def _tiny_model(out: Path) -> Path:
    from app.selfcheck.random_qwen3_asr import build

    return build(out, "tiny", device="cpu", dtype="float32")


def _line(row: dict) -> str:
    return (f"{row['name']:<32} {row['requests_per_s'] or 0:>7.2f} req/s  p95 {row['p95_ms'] or 0:>9.0f} ms  "
            f"{row['ok']}/{row['requests']} ok")


def markdown(result: dict) -> str:
    lines = [f"Engines on {result['device']}, {result['cpu']} ({result['cores']} cores), model: {result['model']}; "
             "one instance each, through nginx.", "",
             "| engine | max_batch | concurrency | requests/s | p50 ms | p95 ms | ok |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['engine']} | {r['max_batch']} | {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['ok']}/{r['requests']} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench engines", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Qwen3-ASR -hf directory both engines serve (default: tiny random weights)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--engines", type=lambda t: [e for e in t.split(",") if e], default=list(ENGINES))
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",") if x], default=list(CONCURRENCY))
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency, at least 2 x it")
    parser.add_argument("--clips", dest="clips_dir", help="folder of audio files (default: as python -m bench run)")
    parser.add_argument("--limit", type=int, default=4, help="the N shortest clips (default 4)")
    parser.add_argument("--max-seconds", dest="max_seconds", type=float, default=600.0,
                        help="no new request after this long, per concurrency")
    parser.add_argument("--out", help="results folder (default: bench/results/engines-<timestamp>)")
    return parser
