"""Qwen3-ASR through transformers' native ``Qwen3ASRForConditionalGeneration``.

Qwen3-ASR is an audio encoder feeding a Qwen3 language model that writes
``language <Name><asr_text><transcript>``: a language name and text, with no timestamps and no
language probability. So this engine:

- forces a requested language the way the reference implementation does (the assistant turn is
  prefilled with ``language <Name><asr_text>``), and maps the model's language names to ISO codes;
- reports ``language_probability`` as None: the model gives none, and none is invented;
- cuts audio longer than ``chunk_seconds`` at quiet points (``app.audio.chunking``), decodes every chunk of
  every clip in the batch as one left-padded ``generate()`` call, and joins them on one timeline;
  each chunk is a segment: a short clip is one, from its start to its end; a cut one's chunks run
  from the first to the last speech Silero VAD heard in each (VAD runs only where there is cutting
  to do: it costs CPU time in the inference thread);
- times words with a Qwen3-ForcedAligner (``aligner_model``) when one is configured; without one,
  word timestamps are refused rather than guessed.

Checkpoints must be in the transformers (``-hf``) layout: ``load`` refuses anything that would load
with missing weights (an original-layout checkpoint loads with every weight missing and only a
warning: a silently random model).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from app.audio import chunking, vad
from app.engines.base import SAMPLE_RATE, DecodeOptions, Segment, Transcript, Word
from app.engines.torch_common import TORCH_DTYPES, reserved_gpu_memory_mb, resolve_compute_type

ARCHITECTURE = "qwen3_asr"
UNDETERMINED = "und"
DETECT_TOKENS = 12            # enough for "language Cantonese<asr_text>"
DETECT_SECONDS = 30           # language detection looks at the first 30 s, as on the other engines
_BUDGET_STEP_SECONDS = 5      # token budgets are per 5 s of audio, so a clip gets the same budget alone or batched

HF_CHECKPOINT_HELP = (
    "serve a checkpoint in the transformers layout (the '-hf' repositories, e.g. Qwen/Qwen3-ASR-1.7B-hf "
    "or Qwen/Qwen3-ASR-0.6B-hf): download it ahead with `huggingface-cli download Qwen/Qwen3-ASR-1.7B-hf "
    "--local-dir /srv/models/Qwen3-ASR-1.7B-hf` and set model to that directory"
)


class CheckpointError(ValueError):
    """A model directory this engine must not serve; the message says how to get a usable one."""


def token_budget(seconds: float) -> int:
    """Most new tokens a chunk of this length may need: fast speech is about 4 tokens a second
    (one per Chinese character), so 10 a second plus the language prefix is ample. It stops a model
    that never ends (random weights, or noise) from holding the instance; the length is rounded up to
    5 s so that a clip gets the same budget alone and in a batch."""
    step = _BUDGET_STEP_SECONDS * math.ceil(max(seconds, 1e-9) / _BUDGET_STEP_SECONDS)
    return 16 + 10 * step


@dataclass
class _Piece:
    """One chunk of one clip, as it goes to the model."""

    clip: int
    chunk: chunking.Chunk
    audio: np.ndarray
    options: DecodeOptions
    speech: list[dict] | None  # VAD's stretches inside this chunk, in its own samples; None: not cut, VAD not run


class Qwen3AsrEngine:
    """Qwen3-ASR behind the ``Engine`` protocol; build it with ``load``."""

    name = "qwen3-asr"
    multilingual = True
    can_translate = False
    continues_prefix = False

    def __init__(self, model_name: str, device: str, compute_type: str, model, processor,
                 aligner=None, aligner_processor=None, chunk_seconds: float = 30.0):
        from transformers.models.qwen3_asr.processing_qwen3_asr import LANGUAGE_CODE_TO_NAME

        self.model_name = model_name
        self.device = device
        self.compute_type = compute_type
        self.model, self.processor = model, processor
        self.aligner, self.aligner_processor = aligner, aligner_processor
        self.chunk_seconds = chunk_seconds
        self.code_to_name = dict(LANGUAGE_CODE_TO_NAME)
        self.name_to_code = {name.lower(): code for code, name in self.code_to_name.items()}
        self.languages = frozenset(self.code_to_name)

    @property
    def word_timestamps(self) -> bool:
        """Whether words can be timed: only with a forced aligner."""
        return self.aligner is not None

    @classmethod
    def load(cls, model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0,
             aligner_model: str = "", chunk_seconds: float = 30.0) -> Qwen3AsrEngine:
        """Load a local ``-hf`` directory or an already cached hub id, never touching the network."""
        from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        device_type = torch.device(device).type
        compute_type = resolve_compute_type(compute_type, device_type, gpu_default="bfloat16")
        dtype = TORCH_DTYPES[compute_type]
        asr = _load_checked(Qwen3ASRForConditionalGeneration, model, dtype, device, "model")
        processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        aligner = aligner_processor = None
        if aligner_model:
            aligner = _load_checked(Qwen3ASRForTokenClassification, aligner_model, dtype, device, "aligner_model")
            aligner_processor = AutoProcessor.from_pretrained(aligner_model, local_files_only=True)
        return cls(model, device_type, compute_type, asr, processor, aligner, aligner_processor, chunk_seconds)

    # The Engine interface -----------------------------------------------------------------------

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        return self.transcribe_batch([audio], [options])[0]

    def transcribe_batch(self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions]) -> list[Transcript]:
        if len(audios) != len(options):
            raise ValueError(f"{len(audios)} audios but {len(options)} decode options")
        for option in options:
            self._check_options(option)
        pieces = [piece for clip, (audio, option) in enumerate(zip(audios, options))
                  for piece in self._pieces(clip, np.asarray(audio, dtype=np.float32), option)]
        return self._assemble(audios, pieces, self._decode(pieces))

    def _assemble(self, audios: Sequence[np.ndarray], pieces: list[_Piece],
                  texts: list[tuple[str | None, str]]) -> list[Transcript]:
        """Each clip's transcript from its pieces' decoded (language, text): words timed by the aligner
        where asked for, chunks joined on the clip's timeline."""
        words = self._align(pieces, texts) if any(p.options.word_timestamps for p in pieces) else {}
        by_clip: dict[int, list[tuple[_Piece, Transcript]]] = defaultdict(list)
        for i, piece in enumerate(pieces):
            by_clip[piece.clip].append((piece, self._chunk_transcript(piece, *texts[i], words.get(i))))
        return [chunking.join([t for _, t in by_clip[clip]], [p.chunk for p, _ in by_clip[clip]],
                              len(audio) / SAMPLE_RATE)
                for clip, audio in enumerate(audios)]

    def detect_language(self, audios: Sequence[np.ndarray]) -> list[tuple[str, float | None]]:
        """The language the model names for each clip's first 30 s; the model gives no probability."""
        clips = [np.asarray(a[: DETECT_SECONDS * SAMPLE_RATE], dtype=np.float32) for a in audios]
        inputs = self.processor.apply_transcription_request(audio=clips, language=None)
        generated = self._generate(inputs, DecodeOptions(beam_size=1), DETECT_TOKENS)
        parsed = self.processor.decode(generated, return_format="parsed")
        return [(self._code(p["language"]), None) for p in parsed]

    def gpu_memory_mb(self) -> int | None:
        """What torch's allocator holds here, for placement where NVML cannot see this process."""
        return reserved_gpu_memory_mb(self.device)

    # Decoding -----------------------------------------------------------------------------------

    def _check_options(self, options: DecodeOptions) -> None:
        if options.task != "transcribe":
            raise ValueError(f"{self.model_name} transcribes only; it cannot {options.task!r}")
        if options.language is not None and options.language not in self.languages:
            raise ValueError(f"language {options.language!r} is not supported by {self.model_name}")
        if options.beam_size < 1:
            raise ValueError("beam_size must be at least 1")
        if options.word_timestamps and self.aligner is None:
            raise ValueError("word timestamps need a forced aligner model (setting aligner_model)")

    def _pieces(self, clip: int, audio: np.ndarray, options: DecodeOptions) -> list[_Piece]:
        """The clip's chunks, cut at quiet points when it is longer than ``chunk_seconds``."""
        if len(audio) <= self.chunk_seconds * SAMPLE_RATE:
            return [_Piece(clip, chunking.Chunk(0, len(audio), True), audio, options, None)]
        speech = vad.speech_stretches(audio)
        return [_Piece(clip, c, audio[c.start:c.end], options, _inside(speech, c))
                for c in chunking.plan_chunks(audio, self.chunk_seconds, speech)]

    def _decode(self, pieces: list[_Piece]) -> list[tuple[str | None, str]]:
        """(language name or None, text) per piece. Pieces that decode alike share one generate() call:
        greedy and sampled pieces whatever their length (each is cut to its own budget afterwards, which
        leaves greedy output exactly as decoded alone), beam search per budget."""
        results: list[tuple[str | None, str] | None] = [None] * len(pieces)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(pieces):
            budget = token_budget(len(p.audio) / SAMPLE_RATE)
            groups[(p.options.beam_size, p.options.temperature, budget if p.options.beam_size > 1 else 0)].append(i)
        for (beam_size, temperature, _), indices in groups.items():
            group = [pieces[i] for i in indices]
            inputs = self.processor.apply_transcription_request(
                audio=[p.audio for p in group],
                language=[self.code_to_name[p.options.language] if p.options.language else None for p in group],
                prompt=[p.options.initial_prompt.strip() or None for p in group],
            )
            budgets = [token_budget(len(p.audio) / SAMPLE_RATE) for p in group]
            generated = self._generate(inputs, group[0].options, max(budgets))
            for i, piece, row, budget in zip(indices, group, generated, budgets):
                results[i] = self._parse(row[:budget], piece.options.language)
        return results

    def _generate(self, inputs, options: DecodeOptions, max_new_tokens: int) -> torch.Tensor:
        """New tokens only, one row per input (left padding keeps every row's prompt at the end)."""
        inputs = inputs.to(self.model.device)
        inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        sampling = {"do_sample": options.temperature > 0}
        if options.temperature > 0:
            sampling["temperature"] = options.temperature
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=options.beam_size,
                                         **sampling)
        return output[:, inputs["input_ids"].shape[1]:].cpu()

    def _parse(self, tokens: torch.Tensor, forced: str | None) -> tuple[str | None, str]:
        if forced is not None:  # the prefix was prefilled: everything generated is text
            text = self.processor.decode(tokens, return_format="transcription_only")
            return self.code_to_name[forced], text
        parsed = self.processor.decode(tokens, return_format="parsed")
        return parsed["language"], parsed["transcription"]

    def _code(self, name: str | None) -> str:
        """ISO code of a language the model named; "und" when it named none it supports."""
        if not name:
            return UNDETERMINED
        return self.name_to_code.get(name.strip().lower(), UNDETERMINED)

    def _chunk_transcript(self, piece: _Piece, language: str | None, text: str,
                          words: tuple[Word, ...] | None) -> Transcript:
        """The chunk's transcript on its own timeline: one segment, from its first to its last speech
        (or its words), none when nothing was said."""
        duration = len(piece.audio) / SAMPLE_RATE
        code = piece.options.language or self._code(language)
        text = text.strip()
        segments = []
        if text:
            if words:
                segments.append(Segment(words[0].start, words[-1].end, text, words))
            else:
                start = piece.speech[0]["start"] / SAMPLE_RATE if piece.speech else 0.0  # None or no speech:
                end = piece.speech[-1]["end"] / SAMPLE_RATE if piece.speech else duration    # the whole chunk
                segments.append(Segment(round(start, 3), round(min(end, duration), 3), text))
        return Transcript(text=text, language=code, duration=duration, segments=segments, language_probability=None)

    # Word timestamps ----------------------------------------------------------------------------

    def _align(self, pieces: list[_Piece], texts: list[tuple[str | None, str]]) -> dict[int, tuple[Word, ...]]:
        """Words with times for every piece that asked for them and has a word the aligner can align
        (a transcript of symbols only, a music note say, has none: it gets no words, not an error):
        one aligner call."""
        from transformers.models.qwen3_asr.processing_qwen3_asr import FORCED_ALIGNER_LANGUAGES

        wanted = [i for i, p in enumerate(pieces) if p.options.word_timestamps and texts[i][1].strip()]
        languages = [texts[i][0] if texts[i][0] in FORCED_ALIGNER_LANGUAGES else None for i in wanted]
        for i, name in zip(wanted, languages):
            if name in ("Japanese", "Korean"):
                raise ValueError(f"word timestamps for {name} need its word splitter (nagisa or soynlp), "
                                 "which this service does not install")
        alignable = [bool(self.aligner_processor.split_words_for_alignment(texts[i][1], name))
                     for i, name in zip(wanted, languages)]
        wanted = [i for i, ok in zip(wanted, alignable) if ok]
        languages = [name for name, ok in zip(languages, alignable) if ok]
        if not wanted:
            return {}
        try:
            inputs, word_lists = self.aligner_processor.prepare_forced_aligner_inputs(
                audio=[pieces[i].audio for i in wanted], transcript=[texts[i][1] for i in wanted],
                language=languages)
        except (ValueError, ImportError) as e:
            raise ValueError(f"the forced aligner cannot align this transcript: {e}") from None
        inputs = inputs.to(self.aligner.device)
        inputs["input_features"] = inputs["input_features"].to(self.aligner.dtype)
        with torch.inference_mode():
            logits = self.aligner(**inputs).logits
        timed = self.aligner_processor.decode_forced_alignment(
            logits, inputs["input_ids"], word_lists, self.aligner.config.timestamp_token_id)
        out = {}
        for i, items in zip(wanted, timed):
            duration = len(pieces[i].audio) / SAMPLE_RATE
            out[i] = tuple(
                Word(round(min(item["start_time"], duration), 3),
                     round(min(max(item["end_time"], item["start_time"]), duration), 3),
                     ("" if chunking.unspaced(item["text"][0]) else " ") + item["text"])
                for item in items)
        return out


def _inside(speech: list[dict], chunk: chunking.Chunk) -> list[dict]:
    """VAD stretches that overlap ``chunk``, clipped to it and moved onto its own timeline."""
    return [{"start": max(s["start"], chunk.start) - chunk.start, "end": min(s["end"], chunk.end) - chunk.start}
            for s in speech if s["start"] < chunk.end and s["end"] > chunk.start]


def _load_checked(model_class, path: str, dtype: torch.dtype, device: str, setting: str):
    """Load ``model_class`` from ``path`` or raise ``CheckpointError`` saying why it cannot serve.

    transformers loads a checkpoint whose tensor names it does not know with those weights freshly
    initialised and only a warning; here every missing or unexpected weight is a refusal.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable config means: not a usable checkpoint
        raise CheckpointError(f"{setting} {path!r} has no usable transformers config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); {HF_CHECKPOINT_HELP}") from None
    if config.model_type != ARCHITECTURE:
        raise CheckpointError(f"{setting} {path!r} is a {config.model_type!r} model, not Qwen3-ASR "
                              f"({ARCHITECTURE!r}); {HF_CHECKPOINT_HELP}")
    model, info = model_class.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True)
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if missing or unexpected or info.get("mismatched_keys"):
        example = (missing or unexpected or [""])[0]
        raise CheckpointError(
            f"{setting} {path!r} does not match the transformers Qwen3-ASR layout: {len(missing)} weights missing"
            f", {len(unexpected)} unexpected (e.g. {example!r}); an original-layout checkpoint would be served "
            f"as a random model. {HF_CHECKPOINT_HELP[0].upper()}{HF_CHECKPOINT_HELP[1:]}")
    return model.to(device).eval()
