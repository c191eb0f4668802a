"""The clips a benchmark sends: the English set-A clips of the real speech in ../shared/audio by default
(``ASR_SHARED_AUDIO`` moves it; it comes from public repositories and is never copied into the project),
or every audio file in a folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# A checkout's ../shared/audio; from an installed package only where ASR_SHARED_AUDIO names it.
CHECKOUT = Path(__file__).resolve().parents[2]
SPEECH = Path(os.environ.get("ASR_SHARED_AUDIO", CHECKOUT.parent / "shared" / "audio"))
# What the project's own speech says where the real speech is absent: sentences of a few seconds each.
SENTENCES = (
    "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country.",
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning, after the meeting.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "We measure how long each request takes, from the first byte to the last.",
)
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
    if folder is None and not manifest.exists():
        print(f"clips: {len(SENTENCES)} sentences spoken by espeak-ng (no real speech at {root})", flush=True)
        clips = [Clip(f"espeak-{i}.wav", data, _duration(data, max_seconds))
                 for i, data in enumerate(espeak_wav(t) for t in SENTENCES)]
        return sorted(clips, key=lambda c: c.duration)[:limit] if limit else clips
    if manifest.exists():
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        paths = [root / r["file"] for r in rows if r.get("language") == "en" and r.get("set") == "A"]
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    else:
        raise FileNotFoundError(f"no clips: {root} is neither a folder of audio nor has a manifest.jsonl "
                                "(the real speech is ../shared/audio beside the checkout, or set ASR_SHARED_AUDIO; "
                                "or pass --clips with a folder of your own)")
    if not paths:
        raise FileNotFoundError(f"no audio clips found under {root}")
    print(f"clips: {len(paths)} from {root}", flush=True)
    clips = [_clip(p, max_seconds) for p in paths]
    if limit:
        clips = sorted(clips, key=lambda c: c.duration)[:limit]
    return clips


def espeak_wav(text: str, voice: str = "en", speed: int = 150) -> bytes:
    """``text`` spoken by espeak-ng (scripts/setup.sh installs it) as a WAV file: speech the project
    makes itself. Voice "en" at 150 words a minute is what the embedded tiny.en hears word for word."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed (scripts/setup.sh installs it)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", f.name, text], check=True,
                       capture_output=True, timeout=120)
        return Path(f.name).read_bytes()


def _clip(path: Path, max_seconds: float) -> Clip:
    data = path.read_bytes()
    return Clip(path.name, data, _duration(data, max_seconds))


def _duration(data: bytes, max_seconds: float) -> float:
    from app.audio.decode import decode_audio

    return decode_audio(data, max_seconds).duration
