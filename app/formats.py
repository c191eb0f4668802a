"""Turn a transcript into what the client asked for."""
from __future__ import annotations

from flask import Response, jsonify

from app.engines.base import Transcript

OUTPUTS = ("json", "txt")


def render(transcript: Transcript, output: str, extra: dict) -> Response:
    if output == "txt":
        return Response(transcript.text + "\n", mimetype="text/plain")
    return jsonify(
        text=transcript.text,
        language=transcript.language,
        language_probability=transcript.language_probability,
        duration=round(transcript.duration, 3),
        segments=[
            {"id": i, "start": s.start, "end": s.end, "text": s.text}
            for i, s in enumerate(transcript.segments)
        ],
        **extra,
    )
