"""The Hugging Face transformers (PyTorch) engine.

Whisper checkpoints decode through ``WhisperForConditionalGeneration.generate()`` so that
timestamps, prompts, word timestamps and batched search come from the reference implementation; any
other speech model goes through the ASR pipeline and yields text only. Decoding
settings are always passed explicitly: the ASR pipeline defaults to 5 beams while
``generate()`` defaults to greedy, and the two engines must decode alike.

Whisper checkpoints are decoded window by window here, each generate() call one 30 s window of
every clip in the batch (``force_unique_generate_call``), moving on from the window's last timestamp
as faster-whisper and generate()'s own long-form loop do. That loop is ours so that Whisper's guards
against hallucination (``app.engines.fallback``) are faster-whisper's: after one encoder call and
generate() at one temperature, one teacher-forced decoder pass reads each window's average
log-probability and no-speech probability; the windows that fail go again, together, at the next
temperature (5 seeded samples each, the likeliest kept). generate()'s own fallback is not used: in a
batch it skips the wrong clip's window as silence (its ``should_skip`` is indexed by the position in
the retried batch, the loop reads it by clip: measured, a clip of speech batched with noise lost all
its words) and reads the no-speech probability of another clip's row under beam search; it also
measures the compression of token ids rather than of text, and keeps the last result when all fail.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from app.engines import fallback
from app.engines.base import SAMPLE_RATE, DecodeOptions, Segment, Transcript, Word
from app.engines.torch_common import TORCH_DTYPES, reserved_gpu_memory_mb, resolve_compute_type

WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's encoder sees 30 s at a time
_TEXT_CONTEXT = 448                # Whisper's decoder positions: prompt, start sequence and new tokens
_PROMPT_TOKENS = _TEXT_CONTEXT // 2 - 1  # the most of an initial prompt kept (its end), as whisper does
_FRAMES_PER_SECOND = 100           # log-mel frames: one per 160 samples
_INPUT_STRIDE = 2                  # mel frames per timestamp token (0.02 s)
_SENTENCE_ENDS = set(".。!！?？")
_UNDETERMINED = "und"  # ISO 639-2 code for a language the model cannot report


class TransformersEngine:
    """A transformers model behind the ``Engine`` protocol; build it with ``load``."""

    name = "transformers"

    def __init__(self, model_name: str, device: str, compute_type: str, runner: _WhisperRunner | _PipelineRunner):
        self.model_name = model_name
        self.device = device
        self.compute_type = compute_type
        self._runner = runner
        self.multilingual = runner.multilingual
        self.languages = runner.languages
        self.can_translate = runner.multilingual
        self.word_timestamps = isinstance(runner, _WhisperRunner)
        self.continues_prefix = False

    @classmethod
    def load(
        cls, model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0
    ) -> TransformersEngine:
        """Load a local model directory or an already cached hub id, never touching the network."""
        from transformers import AutoConfig

        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        device_type = torch.device(device).type
        compute_type = resolve_compute_type(compute_type, device_type)
        dtype = TORCH_DTYPES[compute_type]
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        if config.model_type == "whisper":
            runner = _WhisperRunner(model, device, dtype)
        else:
            runner = _PipelineRunner(model, device, dtype)
        return cls(model, device_type, compute_type, runner)

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        return self.transcribe_batch([audio], [options])[0]

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions]
    ) -> list[Transcript]:
        if len(audios) != len(options):
            raise ValueError(f"{len(audios)} audios but {len(options)} decode options")
        for option in options:
            self._check_options(option)
        return self._runner.transcribe_batch(list(audios), list(options))

    def detect_language(self, audios: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        return self._runner.detect_language([np.asarray(a[:WINDOW_SAMPLES], dtype=np.float32) for a in audios])

    def gpu_memory_mb(self) -> int | None:
        return reserved_gpu_memory_mb(self.device)

    def _check_options(self, options: DecodeOptions) -> None:
        if options.language is not None and options.language not in self.languages:
            raise ValueError(f"language {options.language!r} is not supported by {self.model_name}")
        if options.task not in ("transcribe", "translate"):
            raise ValueError(f"unknown task {options.task!r}")
        if options.task == "translate" and not self.multilingual:
            raise ValueError(f"{self.model_name} is not multilingual and cannot translate")
        if options.beam_size < 1:
            raise ValueError("beam_size must be at least 1")


def token_budget(seconds: float) -> int:
    """Most tokens a window of this length can need: about 12 per second of audio (fast speech is
    about 6, timestamps add 2 per segment) plus the prompt.

    Without it, silence or noise makes Whisper repeat a phrase ("Thank you for watching.") until the
    448-token context is full, and beam search on a CPU then holds the instance for minutes.
    faster-whisper stops such windows with its no-speech check; transformers' short-form generate()
    does not.
    """
    return min(440, 16 + math.ceil(12 * seconds))


class _WhisperRunner:
    """Whisper through generate(), one window at a time: timestamps on, so every transcript has segments."""

    def __init__(self, model: str, device: str, dtype: torch.dtype):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(model, local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(
            model, dtype=dtype, local_files_only=True
        ).to(device).eval()
        generation = self.model.generation_config
        self.lang_to_id: dict[str, int] = dict(getattr(generation, "lang_to_id", None) or {})
        self.multilingual = bool(getattr(generation, "is_multilingual", False) and self.lang_to_id)
        self.languages = (
            frozenset(token[2:-2] for token in self.lang_to_id) if self.multilingual else frozenset({"en"})
        )

    def _text(self, tokens: list[int]) -> str:
        """The text of a window's tokens (those before end of text: no timestamps, no control tokens)."""
        eot = self.processor.tokenizer.eos_token_id
        return self.processor.tokenizer.decode([t for t in tokens if t < eot])

    def transcribe_batch(self, audios: list[np.ndarray], options: list[DecodeOptions]) -> list[Transcript]:
        """One window-by-window decode per group of clips that share decoding settings and are all
        short (their features padded to one window) or all long (padded to the longest)."""
        results: list[Transcript | None] = [None] * len(audios)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (audio, option) in enumerate(zip(audios, options)):
            long_form = len(audio) > WINDOW_SAMPLES
            groups[(long_form, option.task, option.beam_size, option.temperature, option.fallback,
                    option.initial_prompt.strip(), option.word_timestamps)].append(i)
        for (long_form, *_), indices in groups.items():
            transcripts = self._decode([audios[i] for i in indices], [options[i] for i in indices], long_form)
            for i, transcript in zip(indices, transcripts):
                results[i] = transcript
        return results

    def detect_language(self, audios: list[np.ndarray]) -> list[tuple[str, float]]:
        if not self.multilingual:
            return [("en", 1.0)] * len(audios)
        features = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        input_features = features.input_features.to(self.model.device, self.model.dtype)
        return self._detect(list(range(len(audios))), input_features)

    def _prompt_ids(self, text: str) -> torch.Tensor | None:
        """<|startofprev|> and the prompt's last tokens, encoded with one leading space as whisper does."""
        if not text.strip():
            return None
        ids = self.processor.get_prompt_ids(text.strip(), return_tensors="pt")
        return torch.cat([ids[:1], ids[1:][-_PROMPT_TOKENS:]]).to(self.model.device)

    def _decode(self, audios: list[np.ndarray], options: list[DecodeOptions], long_form: bool) -> list[Transcript]:
        """Decode clips that share every decoding setting but the language."""
        features = self.processor.feature_extractor(
            [np.asarray(audio, dtype=np.float32) for audio in audios],
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=True,
            # long-form: keep every frame; short: pad to the 30 s window the encoder expects
            truncation=not long_form,
            padding="longest" if long_form else "max_length",
        )
        input_features = features.input_features.to(self.model.device, self.model.dtype)
        languages = self._languages(input_features, options)
        first = options[0]
        prompt_ids = self._prompt_ids(first.initial_prompt)
        clips = [_Clip(int(frames), primed=prompt_ids is not None) for frames in features.attention_mask.sum(-1)]
        codes = [code for code, _ in languages]
        while active := [i for i, c in enumerate(clips) if c.seek < c.frames]:
            for primed in (True, False):  # generate() takes one prompt for a batch: first windows apart
                if group := [i for i in active if clips[i].primed == primed]:
                    self._round(input_features, clips, group, codes, first, prompt_ids if primed else None)
        return [
            self._transcript(c.segments, len(audio) / SAMPLE_RATE, language, probability, first.word_timestamps)
            for c, audio, (language, probability) in zip(clips, audios, languages)
        ]

    def _round(self, input_features: torch.Tensor, clips: list[_Clip], group: list[int], codes: list[str],
               options: DecodeOptions, prompt_ids: torch.Tensor | None) -> None:
        """The current window of each clip in ``group``: one encoder call, generate() at the first
        temperature, the windows that fail Whisper's checks again together at the next ones."""
        from transformers.modeling_outputs import BaseModelOutput

        window = self.processor.feature_extractor.nb_max_frames
        sizes = [min(window, clips[i].frames - clips[i].seek) for i in group]
        # A short clip's first window is its padded 30 s as the extractor made it; later windows are
        # padded with zeros, as generate()'s long-form decoding does.
        windows = torch.stack([nn.functional.pad(w, (0, window - w.shape[-1])) for w in
                               (input_features[i, :, clips[i].seek:clips[i].seek + window] for i in group)])
        masks = torch.arange(window, device=windows.device)[None, :] < torch.tensor(sizes, device=windows.device)[:, None]
        with torch.inference_mode():
            encoded = self.model.get_encoder()(windows).last_hidden_state
        settings = {"return_timestamps": True, "return_segments": True, "force_unique_generate_call": True,
                    "return_token_timestamps": options.word_timestamps}
        if self.multilingual:  # generate() rejects language/task for English-only models
            settings["task"] = options.task
        if prompt_ids is not None:  # on the first window only, as faster-whisper without conditioning
            settings.update(prompt_ids=prompt_ids, prompt_condition_type="first-segment")
        room = _TEXT_CONTEXT - 4 - (0 if prompt_ids is None else len(prompt_ids))
        settings["max_new_tokens"] = min(room, token_budget(max(sizes) / _FRAMES_PER_SECOND))

        def decode(indices: list[int], temperature: float) -> list[fallback.Attempt]:
            copies = fallback.BEST_OF if temperature > 0 else 1
            rows = [k for k in indices for _ in range(copies)]
            search = {"num_beams": 1, "do_sample": True, "temperature": temperature} if temperature > 0 else \
                {"num_beams": options.beam_size, "do_sample": False}
            languages = [codes[group[k]] for k in rows] if self.multilingual else None
            with torch.inference_mode(), self._seeded():
                output = self.model.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoded[rows]), attention_mask=masks[rows],
                    **search, **settings, **({"language": languages} if languages else {}))
            tokens = [self._generated(row) for row in output["sequences"]]
            scores = self._scores(encoded[rows], tokens, languages, options.task, prompt_ids)
            attempts = [fallback.Attempt(self._text(t), logprob, no_speech, temperature, (segments, t))
                        for t, (logprob, no_speech), segments in zip(tokens, scores, output["segments"])]
            return [max(attempts[k:k + copies], key=lambda a: a.avg_logprob) for k in range(0, len(rows), copies)]

        ladder = fallback.temperatures(options.temperature, options.fallback)
        for i, size, kept in zip(group, sizes, fallback.decode_with_fallback(len(group), decode, ladder)):
            self._advance(clips[i], size, kept)

    def _advance(self, clip: _Clip, size: int, attempt: fallback.Attempt) -> None:
        """Take one window's result: skip it as silence, or keep its segments (generate() leaves out an
        unfinished last one) and move on to where the next window starts."""
        if fallback.is_silence(attempt):
            clip.seek += size  # a skipped window keeps the prompt for the next one, as faster-whisper does
            return
        clip.primed = False
        segments, tokens = attempt.result
        offset = clip.seek / _FRAMES_PER_SECOND
        for segment in segments:
            moved = {**segment, "start": float(segment["start"]) + offset, "end": float(segment["end"]) + offset,
                     "temperature": attempt.temperature}
            if "token_timestamps" in segment:
                moved["token_timestamps"] = segment["token_timestamps"] + offset
            clip.segments.append(moved)
        begin = self.model.generation_config.no_timestamps_token_id + 1
        stamps = [t >= begin for t in tokens]
        pairs = [j for j in range(1, len(tokens)) if stamps[j - 1] and stamps[j]]
        ends_complete = stamps[-2:] == [False, True]
        step = size if ends_complete or not pairs else (tokens[pairs[-1] - 1] - begin) * _INPUT_STRIDE
        clip.seek += step if step > 0 else size  # never the same window twice

    def _generated(self, row: torch.Tensor) -> list[int]:
        """The tokens generate() wrote in one window: after the start sequence, before end of text."""
        tokens = row.tolist()
        config = self.model.generation_config
        start = len(tokens) - 1 - tokens[::-1].index(config.decoder_start_token_id)
        tokens = tokens[start + (3 if self.multilingual else 1):]
        eot = self.processor.tokenizer.eos_token_id
        return tokens[:tokens.index(eot)] if eot in tokens else tokens

    def _scores(self, encoded: torch.Tensor, tokens: list[list[int]], languages: list[str] | None, task: str,
                prompt_ids: torch.Tensor | None) -> list[tuple[float, float]]:
        """(average log-probability, no-speech probability) of each window's tokens, from one decoder
        pass over the start sequence, the tokens and end of text: the log-probability of the tokens
        and end of text over their count, and <|nospeech|>'s probability after <|startoftranscript|>,
        as faster-whisper reads them from CTranslate2."""
        config = self.model.generation_config
        eot = self.processor.tokenizer.eos_token_id
        prompt = [] if prompt_ids is None else prompt_ids.tolist()
        starts = [prompt + [config.decoder_start_token_id]
                  + ([self.lang_to_id[f"<|{languages[i]}|>"], config.task_to_id[task]] if languages else [])
                  for i in range(len(tokens))]
        rows = [start + t + [eot] for start, t in zip(starts, tokens)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [eot] * (width - len(r)) for r in rows], device=encoded.device)
        with torch.inference_mode():  # causal: the padding on the right changes nothing before it
            logits = self.model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits.float()
        logprobs = logits.log_softmax(dim=-1)
        no_speech = config.no_timestamps_token_id - 1
        scores = []
        for i, (start, t) in enumerate(zip(starts, tokens)):
            targets = torch.tensor(t + [eot], device=ids.device)
            picked = logprobs[i, len(start) - 1:len(start) - 1 + len(targets)].gather(-1, targets[:, None])
            scores.append((float(picked.sum()) / len(targets), float(logprobs[i, len(prompt), no_speech].exp())))
        return scores

    @contextmanager
    def _seeded(self):
        """Sampling seeded, without touching the process's own random state."""
        device = self.model.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(fallback.SEED)
            yield

    def _languages(self, input_features: torch.Tensor, options: list[DecodeOptions]) -> list[tuple[str, float]]:
        """The requested language (probability 1, as faster-whisper reports it), else the one detected
        on the first window, with its probability."""
        if not self.multilingual:
            return [("en", 1.0)] * len(options)
        detected = iter(self._detect([i for i, o in enumerate(options) if o.language is None], input_features))
        return [(o.language, 1.0) if o.language is not None else next(detected) for o in options]

    def _detect(self, indices: list[int], input_features: torch.Tensor) -> list[tuple[str, float]]:
        if not indices:
            return []
        window = input_features[indices, :, : self.processor.feature_extractor.nb_max_frames]
        start = torch.full(
            (len(indices), 1), self.model.generation_config.decoder_start_token_id, device=self.model.device
        )
        tokens = list(self.lang_to_id)
        with torch.inference_mode():
            logits = self.model(input_features=window, decoder_input_ids=start).logits[:, -1]
        probabilities = logits[:, [self.lang_to_id[t] for t in tokens]].float().softmax(dim=-1)
        best = probabilities.max(dim=-1)
        return [(tokens[i][2:-2], round(p, 4)) for i, p in zip(best.indices.tolist(), best.values.tolist())]

    def _transcript(
        self, segments: list[dict], duration: float, language: str, probability: float, words: bool
    ) -> Transcript:
        """Segment and word times are clipped to the audio: a window padded to 30 s can end past it.
        With words, a segment spans its words, as in whisper and faster-whisper."""
        tokenizer = self.processor.tokenizer
        texts = [tokenizer.decode(s["tokens"], skip_special_tokens=True) for s in segments]
        parts = []
        for s, text in zip(segments, texts):
            if not text.strip():
                continue
            part = Segment(start=min(float(s["start"]), duration), end=min(float(s["end"]), duration),
                           text=text.strip(), temperature=s.get("temperature"))
            if words and (timed := self._words(s, language, duration)):
                part = Segment(timed[0].start, timed[-1].end, part.text, timed, part.temperature)
            parts.append(part)
        return Transcript(
            text="".join(texts).strip(),
            language=language,
            duration=duration,
            segments=parts,
            language_probability=probability,
        )


    def _words(self, segment: dict, language: str, duration: float) -> tuple[Word, ...]:
        """Group a segment's text tokens into words, timed by generate()'s token timestamps (DTW over
        the alignment heads' cross-attention), where token i ends at ``token_timestamps[i]`` and
        starts where token i-1 ended; the word grouping is the one transformers' ASR pipeline uses."""
        from transformers.models.whisper.tokenization_whisper import LANGUAGES, _combine_tokens_into_words

        tokenizer = self.processor.tokenizer
        tokens, times = segment["tokens"].tolist(), segment["token_timestamps"].tolist()
        text = [i for i, token in enumerate(tokens) if token < tokenizer.eos_token_id]
        words, _, members = _combine_tokens_into_words(
            tokenizer, [tokens[i] for i in text], LANGUAGES.get(language, "english"))
        spans, stops = [], []
        for indices in members:
            first, last = text[indices[0]], text[indices[-1]]
            start = times[first - 1] if first > 0 else float(segment["start"])
            spans.append([min(start, duration), min(max(start, times[last]), duration)])
            ends_sentence = len(indices) > 1 and tokenizer.decode([tokens[last]]).strip() in _SENTENCE_ENDS
            stops.append(times[last - 1] if ends_sentence else None)  # where its full stop begins
        if spans:
            # whisper's rules for what alignment stretches over a pause: the first word after one, and
            # a full stop before one, last at most twice the median word length (itself at most 0.7 s).
            longest = 2 * min(0.7, float(np.median([end - start for start, end in spans])))
            spans[0][0] = max(spans[0][0], spans[0][1] - longest)
            for span, stop in zip(spans, stops):
                if stop is not None:
                    span[1] = max(span[0], min(span[1], stop + longest))
        return tuple(Word(round(start, 3), round(end, 3), word) for word, (start, end) in zip(words, spans))


@dataclass
class _Clip:
    """One clip's state while its windows are decoded."""

    frames: int                   # log-mel frames of its audio
    primed: bool = False          # the initial prompt still waits for the first window that is not silence
    seek: int = 0                 # the next frame to decode
    segments: list[dict] = field(default_factory=list)


class _PipelineRunner:
    """Any other transformers speech model (CTC or seq2seq): text only, one segment per clip.

    Such models cannot be steered to a language, so they accept none and report "und".
    """

    multilingual = False
    languages: frozenset[str] = frozenset()

    def __init__(self, model: str, device: str, dtype: torch.dtype):
        from transformers import pipeline

        self.pipeline = pipeline(
            "automatic-speech-recognition", model=model, device=device, dtype=dtype, local_files_only=True
        )

    def transcribe_batch(self, audios: list[np.ndarray], options: list[DecodeOptions]) -> list[Transcript]:
        for option in options:
            if option.initial_prompt.strip() or option.word_timestamps:
                raise ValueError("prompts and word timestamps need a Whisper model")
        return [self._transcribe(audio, option) for audio, option in zip(audios, options)]

    def detect_language(self, audios: list[np.ndarray]) -> list[tuple[str, float]]:
        raise ValueError("language detection needs a Whisper model")

    def _transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        kwargs = {}
        if self.pipeline.type == "seq2seq":  # CTC decoding is a per-frame argmax: nothing to set
            decoding = {"num_beams": options.beam_size, "do_sample": options.temperature > 0}
            if options.temperature > 0:
                decoding["temperature"] = options.temperature
            kwargs["generate_kwargs"] = decoding
        samples = np.asarray(audio, dtype=np.float32)
        with torch.inference_mode():
            text = self.pipeline({"raw": samples, "sampling_rate": SAMPLE_RATE}, **kwargs)["text"].strip()
        duration = len(samples) / SAMPLE_RATE
        return Transcript(
            text=text,
            language=_UNDETERMINED,
            duration=duration,
            segments=[Segment(0.0, duration, text)] if text else [],
        )
