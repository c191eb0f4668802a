"""Word error rate as the project measures it, in one place for the tests and every benchmark."""
from __future__ import annotations

import re

_NUMBERS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize(text: str) -> str:
    """Lower case, no punctuation, digits 0-10 spelled out: what WER should compare."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(_NUMBERS.get(w, w) for w in text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER of the normalised texts, to 4 decimals."""
    import jiwer

    return round(jiwer.wer(normalize(reference), normalize(hypothesis)), 4)
