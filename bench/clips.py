"""The clips a benchmark sends: the repository's English set-A clips (tests/data/audio) by default, or every audio file in a folder."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEECH = Path(os.environ.get("ASR_SPEECH", REPO / "tests" / "data" / "audio"))
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac"}


@dataclass(frozen=True)
class Clip:
    name: str
    data: bytes        # the file as uploaded
    duration: float    # seconds, as the service decodes it (16 kHz samples / 16000)


def load_clips(folder: str | os.PathLike | None = None, limit: int | None = None,
               max_seconds: float = 600.0) -> list[Clip]:
    """Set-A English clips from the manifest, or every audio file in ``folder`` (a folder with a
    ``manifest.jsonl`` is read through it, English set A). ``limit`` keeps the shortest ones."""
    root = Path(folder) if folder else SPEECH
    manifest = root / "manifest.jsonl"
    if manifest.exists():
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        paths = [root / r["file"] for r in rows if r.get("language") == "en" and r.get("set") == "A"]
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    else:
        raise FileNotFoundError(f"no clips: {root} is neither a folder of audio nor has a manifest.jsonl")
    if not paths:
        raise FileNotFoundError(f"no audio clips found under {root}")
    clips = [_clip(p, max_seconds) for p in paths]
    if limit:
        clips = sorted(clips, key=lambda c: c.duration)[:limit]
    return clips


def _clip(path: Path, max_seconds: float) -> Clip:
    from app.audio import decode_audio

    data = path.read_bytes()
    return Clip(path.name, data, decode_audio(data, max_seconds).duration)
