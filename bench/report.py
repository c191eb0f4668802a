"""Numbers from records: latency percentiles, throughput (audio seconds per second, RTFx), the ratios
the targets are stated in; and the files a run leaves: JSON, CSV, PNG plots and a Markdown summary."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from bench.load import Record

TARGETS = {
    "served_vs_bare_saturation": (">=", 0.97, "served / bare throughput at saturation, 1 instance on all cores"),
    "instances_scaling": (">=", 1.8, "2 single-thread instances / 1, throughput"),
    "overhead_p50_ms": ("<=", 5.0, "p50 of what the service adds around the engine call, concurrency 1 (ms)"),
}


def percentiles_ms(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    a = np.asarray(latencies) * 1000
    return {"p50_ms": _r(np.percentile(a, 50)), "p95_ms": _r(np.percentile(a, 95)),
            "p99_ms": _r(np.percentile(a, 99)), "mean_ms": _r(a.mean()), "max_ms": _r(a.max())}


def summarize_http(name: str, records: list[Record], **extra) -> dict:
    """One measured configuration over one or more blocks (``walls`` holds each block's wall seconds)."""
    ok = [r for r in records if r.ok]
    walls = extra.pop("walls", None) or ([max(r.end for r in records) - min(r.start for r in records)]
                                         if records else [0.0])
    wall = sum(walls)
    audio = sum(r.audio_s for r in ok)
    return {
        "name": name,
        "kind": "served",
        **extra,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_codes": dict(Counter(r.error for r in records if not r.ok)),
        "wall_s": _r(wall),
        "audio_s": _r(audio),
        "rtfx": _r(audio / wall) if wall else None,
        "requests_per_s": _r(len(ok) / wall) if wall else None,
        **percentiles_ms([r.latency for r in ok]),
        "inference_p50_ms": _median_ms([r.inference_s for r in ok if r.inference_s is not None]),
        "queue_p50_ms": _median_ms([r.queue_s for r in ok if r.queue_s is not None]),
        "overhead_p50_ms": _median_ms([r.overhead for r in ok if r.overhead is not None]),
    }


def summarize_bare(name: str, latencies: list[float], clips: int, audio: float, wall: float, cpu: float,
                   **extra) -> dict:
    """``clips`` transcribed back to back in ``wall`` seconds; percentiles from ``latencies``."""
    return {
        "name": name,
        "kind": "bare",
        **extra,
        "requests": clips,
        "ok": clips,
        "errors": 0,
        "error_codes": {},
        "wall_s": _r(wall),
        "audio_s": _r(audio),
        "rtfx": _r(audio / wall) if wall else None,
        "requests_per_s": _r(clips / wall) if wall else None,
        "cpu_s": _r(cpu),
        "audio_per_cpu_s": _r(audio / cpu) if cpu else None,
        **percentiles_ms(latencies),
    }


def check_targets(ratios: dict) -> dict:
    out = {}
    for key, (op, bound, meaning) in TARGETS.items():
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"target": f"{op} {bound}", "measured": value, "met": met, "meaning": meaning}
    return out


def write_files(out: Path, result: dict, records: list[Record]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = ["name", "kind", "service", "instances", "threads_per_instance", "concurrency", "rate", "requests",
               "ok", "errors", "wall_s", "audio_s", "rtfx", "requests_per_s", "p50_ms", "p95_ms", "p99_ms",
               "mean_ms", "max_ms", "inference_p50_ms", "queue_p50_ms", "overhead_p50_ms", "cpu_s",
               "audio_per_cpu_s", "other_cores"]
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["runs"])
    with (out / "requests.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Record.__dataclass_fields__) + ["latency_ms", "overhead_ms"])
        writer.writeheader()
        writer.writerows(r.row() for r in records)
    (out / "summary.md").write_text(markdown(result))
    return ["results.json", "runs.csv", "requests.csv", "summary.md", *plot(out, result)]


def plot(out: Path, result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    sweep = sorted((r for r in result["runs"] if r.get("series") == "concurrency"), key=lambda r: r["concurrency"])
    if sweep:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [r["concurrency"] for r in sweep]
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
            ax.plot(xs, [r[key] for r in sweep], style, label=f"served {key[:3]}")
        bare = result["bare"].get("all_cores")
        if bare and bare.get("p50_ms"):
            ax.axhline(bare["p50_ms"], color="grey", linewidth=1, label="bare engine p50 (one at a time)")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("latency (ms)")
        ax.set_xticks(xs)
        ax.set_title(f"Latency vs concurrency: {sweep[0]['service']}")
        files.append(_save(fig, ax, out, "latency_vs_concurrency.png"))
    scaling = sorted((r for r in result["runs"] if r.get("series") == "instances"), key=lambda r: r["instances"])
    if scaling:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [r["instances"] for r in scaling]
        ax.plot(xs, [r["rtfx"] for r in scaling], "o-", label="served (nginx, saturated)")
        one = next((r["rtfx"] for r in scaling if r["instances"] == 1), None)
        if one:
            ax.plot(xs, [one * n for n in xs], ":", color="grey", label="linear from 1 instance")
        bare = sorted((r for r in result["runs"] if r.get("series") == "bare_instances"), key=lambda r: r["instances"])
        if bare:
            ax.plot([r["instances"] for r in bare], [r["rtfx"] for r in bare], "s--", color="black",
                    label="bare engines, 1 core each, side by side")
        ax.set_xlabel("instances (1 core, 1 thread each)")
        ax.set_ylabel("throughput (audio s / s, RTFx)")
        ax.set_xticks(xs)
        ax.set_ylim(bottom=0)
        ax.set_title("Throughput vs instances")
        files.append(_save(fig, ax, out, "throughput_vs_instances.png"))
    return files


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"Measured {meta['started']} on {meta['cpu_model']} ({meta['cores']} cores), engine {meta['engine']} "
        f"({meta['model']}, {meta['compute_type']}, beam {meta['beam_size']}, batch {meta['batch_size']}), "
        f"{meta['clips']} clips ({meta['clip_audio_s']:.1f} s of audio); load average "
        f"{meta['loadavg_start']:.2f} at the start, {meta['loadavg_end']:.2f} at the end.",
        "",
        "| run | concurrency | requests | errors | RTFx (audio s/s) | req/s | p50 ms | p95 ms | p99 ms "
        "| other load (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r.get('concurrency') or r.get('rate') or 1} | {r['requests']} | {r['errors']} "
                     f"| {_f(r['rtfx'])} | {_f(r['requests_per_s'])} | {_f(r['p50_ms'])} | {_f(r['p95_ms'])} "
                     f"| {_f(r['p99_ms'])} | {_f(r.get('other_cores'))} |")
    lines += ["", "| ratio | target | measured | met |", "| --- | --- | ---: | --- |"]
    for key, t in result["targets"].items():
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['meaning']} | {t['target']} | {_f(t['measured'])} | {met} |")
    extra = result["ratios"]
    lines += ["", "Also measured:", ""]
    for key in ("bare_scaling", "instances_scaling_vs_bare",
                "served_vs_bare_cpu_efficiency", "served_vs_bare_one_core", "served_minus_bare_p50_ms",
                "served_inference_vs_bare_p50", "overhead_decode_ms", "overhead_gunicorn_flask_ms",
                "overhead_nginx_ms", "client_cpu_share"):
        if extra.get(key) is not None:
            lines.append(f"- `{key}`: {_f(extra[key])}")
    return "\n".join(lines) + "\n"


def _median_ms(values: list[float]) -> float | None:
    return _r(np.median(values) * 1000) if values else None


def _r(x) -> float:
    return round(float(x), 3)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _save(fig, ax, out, name: str) -> str:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name
