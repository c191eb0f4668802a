"""faster-whisper on CTranslate2: int8 on CPU, float16 on GPU.

One clip goes through faster-whisper's ``WhisperModel.transcribe``. Several clips at once
(``transcribe_batch``, fed by the instance's dynamic batching) are decoded in lockstep: every round
takes the current 30 s window of each unfinished clip, runs one batched encoder call and one batched
beam search on the CTranslate2 model, and moves each clip's position on from its own timestamp
tokens, exactly as faster-whisper's one-clip loop does: with conditioning on previous text (the
default, ``DecodeOptions.condition_on_previous_text``; for clips longer than one window,
``_conditioned``) each window is primed with the tokens of the segments before it, timestamps
included, back to the last window decoded at a temperature above 0.5 (the initial prompt's tokens
first); without it an initial prompt primes the first window that is not skipped as silence. Clips
whose prompts differ in length decode in separate calls of a round. Its guards
against hallucination too (``app.engines.fallback``): the windows of a round whose text loops or is
unlikely are decoded again at the next temperature, in a batch of their own (on their own encoder
call: CTranslate2 cannot take part of an encoded batch), with faster-whisper's sampling settings.
So a batched transcript equals the one-by-one transcript; clips longer than a window simply take
more rounds.

A chunk of a longer recording (``DecodeOptions.ends_in_pause``) goes through the lockstep decode even
alone, and its last window is finished without a second one. Whisper often leaves the last segment of
a window open (it ends on a pair of timestamps, or on text without a closing one) when speech reaches
the window's last seconds; faster-whisper then encodes a second, nearly empty window from that
segment's start. Measured on the embedded tiny.en and a 5-minute recording, 10 of 11 chunks of
23-30 s took that second window (and 3 of 17 chunks of at most 20 s), so chunks cost 1.6 x the
encoder work of window-after-window decoding. For a chunk nothing comes after the window, so the open
segment is decoded again on the same encoder output instead, primed with its start timestamp (one
more beam search, no second encoder call). The chunk takes a second window as before when that
yields no text, when it starts the window over (timestamps before the one it was primed with: the
window's words a second time, measured on long1.wav), when it opens with words the window already
said or with the last words before it, or says five of its words in a row again, or holds more words
than the audio left after its start could (the sentence re-read, measured on set A, long2.wav and
the long-form benchmark's read recipes; numbers compare as figures), when
it makes the window loop (the compression check), and when the window's result was sampled (a
fallback: left as faster-whisper leaves it). An open segment that starts past the chunk's audio is
dropped, where faster-whisper's loop ends (Whisper otherwise writes a word into the padding).
Word timestamps move a clip's position by its last word, so such clips, and those asking for one
temperature above 0, go through faster-whisper one by one, with the same guards. VAD is not the
engine's business: ``app.audio.vad`` cuts the silence out before any engine sees the audio.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from app.engines import fallback
from app.engines.base import SAMPLE_RATE, DecodeOptions, Segment, Transcript, Word

_DEFAULT_COMPUTE = {"cpu": "int8", "cuda": "float16"}

# faster-whisper's transcribe() defaults that shape decoding; the batched path applies the same.
_MAX_LENGTH = 448                 # Whisper's text context, prompt included
_TIME_PRECISION = 0.02            # seconds per timestamp token
_INPUT_STRIDE = 2                 # mel frames per encoder position (= per timestamp token)
_MAX_INITIAL_TIMESTAMP = 1.0      # the first timestamp may not be later than this
PROMPT_RESET_TEMPERATURE = 0.5    # a window decoded hotter than this primes none after it
MAX_WORDS_PER_SECOND = 5.0        # more in a re-decoded open segment is a re-read (``_crowded``)


def resolved_compute_type(device: str, compute_type: str) -> str:
    """The compute type an instance on ``device`` loads for ``compute_type`` ("auto": int8 on CPU,
    float16 on a GPU)."""
    return _DEFAULT_COMPUTE[device] if compute_type == "auto" else compute_type


class CTranslate2Engine:
    name = "ctranslate2"
    word_timestamps = True
    continues_prefix = True

    def __init__(self, model, model_name: str, device: str, compute_type: str):
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self._model = model
        self.model_name = model_name
        self.device = device
        self.compute_type = compute_type
        self.multilingual = bool(model.model.is_multilingual)
        self.languages = frozenset(_LANGUAGE_CODES) if self.multilingual else frozenset({"en"})
        self.can_translate = self.multilingual
        self._suppress: tuple[int, ...] | None = None

    @classmethod
    def load(cls, model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0):
        from faster_whisper import WhisperModel

        compute_type = resolved_compute_type(device, compute_type)
        # A directory loads as is; a name such as "large-v3" or "Systran/faster-whisper-large-v3"
        # resolves from the local Hugging Face cache only: instances never download at start.
        whisper = WhisperModel(model, device=device, compute_type=compute_type,
                               cpu_threads=cpu_threads, num_workers=1, local_files_only=True)
        return cls(whisper, model, device, compute_type)

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        if (options.ends_in_pause or options.prefix) and _lockstep(options):
            return self._decode_lockstep([audio], [options], options.task, options.beam_size)[0]
        window = self._model.feature_extractor.n_samples
        segments, info = self._model.transcribe(
            audio,
            language=options.language if self.multilingual else "en",
            task=options.task,
            beam_size=options.beam_size,
            best_of=fallback.BEST_OF,
            temperature=list(fallback.temperatures(options.temperature, options.fallback)),
            compression_ratio_threshold=fallback.COMPRESSION_RATIO_THRESHOLD,
            log_prob_threshold=fallback.LOG_PROB_THRESHOLD,
            no_speech_threshold=fallback.NO_SPEECH_THRESHOLD,
            condition_on_previous_text=_conditioned(options, len(audio), window),
            prompt_reset_on_temperature=PROMPT_RESET_TEMPERATURE,
            initial_prompt=options.initial_prompt or None,
            word_timestamps=options.word_timestamps,
            vad_filter=False,                  # done before the engine, the same for both (app.audio.vad)
        )
        parts = [Segment(round(s.start, 3), round(s.end, 3), s.text.strip(), _words(s.words), s.temperature)
                 for s in segments]
        return _transcript(parts, info.language, info.language_probability, len(audio))

    def detect_language(self, audios: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """One batched encoder call and language-token ranking over each clip's first 30 s."""
        if not self.multilingual:
            return [("en", 1.0)] * len(audios)
        extractor = self._model.feature_extractor
        return self._detect([extractor(np.asarray(a[:extractor.n_samples], dtype=np.float32)) for a in audios])

    def transcribe_batch(self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions]) -> list[Transcript]:
        """One lockstep decode per group of clips that share task and beam size.

        A temperature above 0 asked for (sampling from the first window on) and word timestamps (they
        steer each clip's next window by its last word) go one by one.
        """
        if len(audios) != len(options):
            raise ValueError(f"{len(audios)} audios but {len(options)} decode options")
        results: list[Transcript | None] = [None] * len(audios)
        groups: dict[tuple[str, int, bool], list[int]] = defaultdict(list)
        for i, option in enumerate(options):
            if _lockstep(option):
                groups[(option.task, option.beam_size, option.fallback)].append(i)
            else:
                results[i] = self.transcribe(audios[i], option)
        for (task, beam_size, _), indices in groups.items():
            if len(indices) == 1:
                results[indices[0]] = self.transcribe(audios[indices[0]], options[indices[0]])
                continue
            decoded = self._decode_lockstep([audios[i] for i in indices], [options[i] for i in indices],
                                            task, beam_size)
            for i, transcript in zip(indices, decoded):
                results[i] = transcript
        return results

    # -- the batched decode ------------------------------------------------------------------------

    def _decode_lockstep(self, audios: list[np.ndarray], options: list[DecodeOptions],
                         task: str, beam_size: int) -> list[Transcript]:
        from faster_whisper.tokenizer import Tokenizer

        extractor = self._model.feature_extractor
        clips = [_Clip(extractor(np.asarray(audio, dtype=np.float32)), len(audio), ends_in_pause=o.ends_in_pause,
                       timestamps=not o.prefix.strip(), conditioned=_conditioned(o, len(audio), extractor.n_samples))
                 for audio, o in zip(audios, options)]
        languages = self._languages(clips, options)
        for clip, option, (language, probability) in zip(clips, options, languages):
            clip.language, clip.language_probability = language, probability
            clip.tokenizer = Tokenizer(self._model.hf_tokenizer, self.multilingual, task=task, language=language)
            if option.initial_prompt.strip():  # encoded as faster-whisper does: one leading space
                clip.prompt = clip.tokenizer.encode(" " + option.initial_prompt.strip())
            if option.prefix.strip():
                clip.prefix = clip.tokenizer.encode(" " + option.prefix.strip())
        window = extractor.nb_max_frames
        ladder = fallback.temperatures(0.0, options[0].fallback)  # the group shares it
        while active := [c for c in clips if c.seek < c.content_frames]:
            # CTranslate2 wants <|startoftranscript|> at one position across a batch, and as many task
            # tokens after it: clips whose prompts differ in length, or that differ in timestamps, decode
            # in separate calls (conditioned prompts reach the same length, half the text context, after
            # a few windows). Prefixes may differ in length.
            by_prompt: dict[tuple[int, bool], list[_Clip]] = defaultdict(list)
            for clip in active:
                by_prompt[(_prompt(clip).index(clip.tokenizer.sot), clip.timestamps)].append(clip)
            for group in by_prompt.values():
                self._decode_round(group, beam_size, window, extractor.time_per_frame, ladder)
        return [_transcript(c.segments, c.language, c.language_probability, c.samples) for c in clips]

    def _decode_round(self, clips: list[_Clip], beam_size: int, window: int, time_per_frame: float,
                      ladder: Sequence[float]) -> None:
        """One batched encoder call and beam search over the current window of each clip; the windows
        that fail Whisper's checks again at the next temperatures."""
        sizes = [min(window, c.content_frames - c.seek) for c in clips]
        windows = [c.features[:, c.seek:c.seek + n] for c, n in zip(clips, sizes)]
        encoded = self._encode(windows)
        prompts = [_prompt(c) for c in clips]

        def decode(indices: list[int], temperature: float) -> list[fallback.Attempt]:
            own = encoded if len(indices) == len(clips) else self._encode([windows[i] for i in indices])
            results = self._generate(own, [prompts[i] for i in indices], beam_size, clips[0].tokenizer,
                                     temperature=temperature)
            return [_attempt(r, clips[i].tokenizer, temperature) for i, r in zip(indices, results)]

        attempts = fallback.decode_with_fallback(len(clips), decode, ladder)
        # CTranslate2 returns a prefix's tokens with what follows them (and Whisper's checks above read
        # both, as faster-whisper's do): the clip's text is what follows.
        tokens = [_after(a.result.sequences_ids[0], _forced(c)) for a, c in zip(attempts, clips)]
        # A chunk's last window that left its last segment open: that segment again on the same
        # encoder output, primed with its start timestamp, rather than a second window.
        # One that starts past the clip's audio is dropped, as faster-whisper's loop drops it.
        opened = {i: at for i, (c, n, t, a) in enumerate(zip(clips, sizes, tokens, attempts))
                  if c.ends_in_pause and c.seek + n >= c.content_frames and a.temperature == 0
                  and (at := _open_segment(t, c.tokenizer.timestamp_begin)) is not None
                  and c.seek + (t[at] - c.tokenizer.timestamp_begin) * _INPUT_STRIDE < c.content_frames}
        if opened:
            begin = clips[0].tokenizer.timestamp_begin
            primed = [[*c.tokenizer.sot_sequence, tokens[i][opened[i]] if i in opened else begin]
                      for i, c in enumerate(clips)]
            again = self._generate(encoded, primed, beam_size, clips[0].tokenizer, initial_timestamp=False)
            for i, at in list(opened.items()):
                whole, decode = tokens[i][:at + 1] + again[i].sequences_ids[0], clips[i].tokenizer.decode
                c = clips[i]
                left = (c.content_frames - c.seek - (whole[at] - begin) * _INPUT_STRIDE) * time_per_frame
                if _continues(whole, at, begin) and not _repeats(decode(whole[:at]), decode(whole[at + 1:])) \
                        and not _crowded(decode(whole[at + 1:]), left) \
                        and not fallback.compression_ratio(decode(whole).strip()) > fallback.COMPRESSION_RATIO_THRESHOLD:
                    tokens[i] = whole
                else:
                    opened.pop(i)
        for i, (clip, size, attempt) in enumerate(zip(clips, sizes, attempts)):
            self._advance(clip, size, attempt, tokens[i], time_per_frame, final=i in opened)

    def _generate(self, encoded, prompts: list[list[int]], beam_size: int, tokenizer, initial_timestamp: bool = True,
                  temperature: float = 0.0):
        """faster-whisper's beam search settings, or its sampling ones above temperature 0 (not
        reproducible: CTranslate2 keeps a random generator per thread that a seed set later does not
        reset); ``initial_timestamp``: the first timestamp may come no later than 1 s into the window
        (off where the prompt already ends on a timestamp)."""
        if temperature > 0:
            search = {"beam_size": 1, "num_hypotheses": fallback.BEST_OF, "sampling_topk": 0,
                      "sampling_temperature": temperature}
        else:
            search = {"beam_size": beam_size, "patience": 1}
        return self._model.model.generate(
            encoded,
            prompts,
            **search,
            length_penalty=1,
            repetition_penalty=1,
            no_repeat_ngram_size=0,
            max_length=_MAX_LENGTH,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppressed_tokens(tokenizer),
            max_initial_timestamp_index=int(round(_MAX_INITIAL_TIMESTAMP / _TIME_PRECISION)) if initial_timestamp else 1500,
        )

    def _languages(self, clips: list[_Clip], options: list[DecodeOptions]) -> list[tuple[str, float]]:
        """The requested language (probability 1), else the one detected on the clip's first 30 s."""
        if not self.multilingual:
            return [("en", 1.0)] * len(clips)
        unknown = [i for i, o in enumerate(options) if o.language is None]
        detected = dict(zip(unknown, self._detect([clips[i].features for i in unknown]))) if unknown else {}
        return [detected.get(i) or (o.language, 1.0) for i, o in enumerate(options)]

    def _detect(self, features: list[np.ndarray]) -> list[tuple[str, float]]:
        """The likeliest language of each clip, from its first window's frames padded to 30 s: the
        input faster-whisper detects on."""
        window = self._model.feature_extractor.nb_max_frames
        encoded = self._encode([f[:, :window] for f in features])
        ranked = self._model.model.detect_language(encoded)
        return [(best[0][0][2:-2], round(float(best[0][1]), 4)) for best in ranked]

    def _encode(self, windows: list[np.ndarray]):
        import ctranslate2
        from faster_whisper.audio import pad_or_trim

        batch = np.ascontiguousarray(np.stack([pad_or_trim(w) for w in windows]))
        return self._model.model.encode(ctranslate2.StorageView.from_array(batch), to_cpu=False)

    def _advance(self, clip: _Clip, size: int, attempt: fallback.Attempt, tokens: list[int],
                 time_per_frame: float, final: bool = False) -> None:
        """Take one window's result: skip it as silence, or cut ``tokens`` into segments and move on
        (``final``: the clip ends with this window, an open last segment up to its end)."""
        if fallback.is_silence(attempt):
            clip.seek += size  # a skipped window keeps the prompt for the next one, as faster-whisper does
            return
        clip.prefix = []
        tokenizer = clip.tokenizer
        time_offset = clip.seek * time_per_frame
        pieces, seek = _split_by_timestamps(tokens, tokenizer.timestamp_begin, time_offset,
                                            size, size * time_per_frame, clip.seek, final)
        said: list[int] = []
        for start, end, piece in pieces:
            text = tokenizer.decode(piece)
            if start != end and text.strip():
                clip.segments.append(Segment(round(start, 3), round(end, 3), text.strip(),
                                             temperature=attempt.temperature))
                said += piece
        # faster-whisper's conditioning: the segments' tokens join the prompt, which a hot window resets.
        keep = clip.conditioned and attempt.temperature <= PROMPT_RESET_TEMPERATURE
        clip.prompt = clip.prompt + said if keep else []
        clip.seek = seek if seek > clip.seek else clip.seek + size  # never decode a window twice

    def _suppressed_tokens(self, tokenizer) -> list[int]:
        """faster-whisper's default ``suppress_tokens=[-1]``: non-speech symbols and the control tokens."""
        if self._suppress is None:
            self._suppress = tuple(sorted(set(tokenizer.non_speech_tokens) | {
                tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                tokenizer.sot_lm, tokenizer.no_speech}))
        return list(self._suppress)


@dataclass
class _Clip:
    """One clip's state in a lockstep decode."""

    features: np.ndarray          # log-mel, (n_mels, frames)
    samples: int
    ends_in_pause: bool = False   # a chunk cut in a pause: its last window may end it (DecodeOptions)
    seek: int = 0                 # the next mel frame to decode
    language: str = "en"
    language_probability: float = 1.0
    tokenizer: object = None
    prompt: list[int] = field(default_factory=list)  # the initial prompt's and (conditioned) the segments' tokens
    prefix: list[int] = field(default_factory=list)  # DecodeOptions.prefix's tokens, likewise
    timestamps: bool = True       # False for a clip with a prefix: its text continues the prefix's
    conditioned: bool = True      # each window primed with the text before it (DecodeOptions)
    segments: list[Segment] = field(default_factory=list)

    @property
    def content_frames(self) -> int:
        return self.features.shape[-1] - 1  # the last frame comes from the extractor's own padding


def _conditioned(options: DecodeOptions, samples: int, window: int) -> bool:
    """Whether windows are primed with the text before them: as asked, for a clip longer than one
    window (``window`` samples, the feature extractor's). A shorter clip's only later window is the
    sliver after a last segment left open, and primed with the clip's text Whisper writes "Thank you"
    there (7.3 s of espeak-ng speech through the OpenAI route); alone, it finds no speech."""
    return options.condition_on_previous_text and samples > window


def _lockstep(options: DecodeOptions) -> bool:
    """Whether the lockstep decode applies: temperature 0 (with or without the fallback ladder), no
    word timestamps."""
    return options.temperature == 0 and not options.word_timestamps


def _attempt(result, tokenizer, temperature: float) -> fallback.Attempt:
    """One window's result with what Whisper's checks read; the average log-probability recovered
    from the length-normalised score as faster-whisper does."""
    tokens = result.sequences_ids[0]
    return fallback.Attempt(tokenizer.decode(tokens), result.scores[0] * len(tokens) / (len(tokens) + 1),
                            result.no_speech_prob, temperature, result)


def _open_segment(tokens: list[int], timestamp_begin: int) -> int | None:
    """Where the open last segment of a window starts (the index of its start timestamp), or None when
    the window ends complete (on a lone timestamp) or has no pair of timestamps at all."""
    if len(tokens) >= 2 and tokens[-2] < timestamp_begin <= tokens[-1]:
        return None
    cuts = [i for i in range(1, len(tokens)) if tokens[i] >= timestamp_begin and tokens[i - 1] >= timestamp_begin]
    return cuts[-1] if cuts else None


def _continues(tokens: list[int], at: int, timestamp_begin: int) -> bool:
    """Whether the tokens after ``at`` (where the open segment was primed) continue the window: some
    text, and no timestamp before the one primed. Whisper sometimes starts the window over instead,
    its timestamps from 0 again: the whole window a second time, word for word."""
    tail = tokens[at + 1:]
    return any(t < timestamp_begin for t in tail) and all(t >= tokens[at] for t in tail if t >= timestamp_begin)


def _repeats(before: str, tail: str, words: int = 3, join: int = 2, run: int = 5) -> bool:
    """Whether ``tail`` re-reads what the window already said: it opens with words of it (its first
    ``words`` of them, in a row) or with the last ``join`` words before it, or it says a run of ``run``
    of its words anywhere. Whisper primed on the open segment re-reads the sentence it was in, with
    timestamps that move on, sometimes with numbers written the other way ("one pound" again as "1
    pound") or after a few words of its own, so numbers compare as figures. Measured on set A: "And so
    my fellow Americans ask not ..." twice in one chunk; on long2.wav: "now leave and take your" then
    "Take your half a man"; on read recipes: "One pound of lobster meat, one teaspoon ..." then "1
    pound of lobster meat, 1 teaspoon ...", and "... the rest speed that was followed when it was
    prepared" after "the recipe that was followed when it was prepared". A false alarm costs only the
    second window faster-whisper would take anyway."""
    said, head = _compared(before), _compared(tail)
    if len(said) >= join and head[:join] == said[-join:]:
        return True
    if len(head) >= words and any(said[k:k + words] == head[:words] for k in range(len(said))):
        return True
    runs = {tuple(said[k:k + run]) for k in range(len(said) - run + 1)}
    return any(tuple(head[k:k + run]) in runs for k in range(len(head) - run + 1))


def _crowded(tail: str, seconds: float) -> bool:
    """Whether ``tail`` holds more words than the ``seconds`` of audio it was primed on could: Whisper
    re-reading earlier speech in other words writes them there all the same. Measured on read speech:
    "the story is regarding Joseph, there is no founder ..." (14 words) in the last 1.4 s of a span,
    after "The stories regarding Joseph, they've traditionally found ...". Read speech runs at 2-4
    words a second; ``MAX_WORDS_PER_SECOND`` and two words to spare leave room for the fastest."""
    return len(_compared(tail)) > 2 + MAX_WORDS_PER_SECOND * max(0.0, seconds)


_NUMBER_WORDS = {w: str(n) for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def _compared(text: str) -> list[str]:
    """``text``'s words as ``_repeats`` compares them: lower case, numbers up to twenty as figures."""
    return [_NUMBER_WORDS.get(w, w) for w in re.findall(r"[\w']+", text.lower())]


def _prompt(clip: _Clip) -> list[int]:
    """faster-whisper's decoder prompt: the initial prompt's last tokens after <|startofprev|> (at most
    half the text context), then the start-of-transcript sequence; for a clip with a prefix,
    <|notimestamps|> and the prefix's last tokens (at most a quarter of the text context), as
    faster-whisper's ``prefix`` with ``without_timestamps``: what the model writes next continues them."""
    tokenizer = clip.tokenizer
    previous = [tokenizer.sot_prev, *clip.prompt[-(_MAX_LENGTH // 2 - 1):]] if clip.prompt else []
    start = list(tokenizer.sot_sequence) if clip.timestamps else [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    return [*previous, *start, *_forced(clip)]


def _forced(clip: _Clip) -> list[int]:
    """The prefix tokens a clip's window is primed with."""
    return clip.prefix[-(_MAX_LENGTH // 4):]


def _after(tokens: list[int], forced: list[int]) -> list[int]:
    return tokens[len(forced):] if forced and tokens[:len(forced)] == forced else tokens


def _words(words) -> tuple[Word, ...]:
    return tuple(Word(round(w.start, 3), round(w.end, 3), w.word, round(float(w.probability), 4))
                 for w in words or ())


def _split_by_timestamps(tokens: list[int], timestamp_begin: int, time_offset: float, size: int,
                         window_seconds: float, seek: int,
                         final: bool = False) -> tuple[list[tuple[float, float, list[int]]], int]:
    """Cut one window's tokens into (start, end, tokens) at each pair of adjacent timestamp tokens;
    return them and the mel frame the next window starts at.

    A window that ends on a lone timestamp is complete: the next starts after it. Otherwise its last
    segment is unfinished: it is dropped and the next window starts at the last timestamp; except in
    a ``final`` window (the clip ends with it), where it is kept up to the window's end.
    """
    def seconds(token: int) -> float:
        return time_offset + (token - timestamp_begin) * _TIME_PRECISION

    ends_complete = len(tokens) >= 2 and tokens[-2] < timestamp_begin <= tokens[-1]
    cuts = [i for i in range(1, len(tokens)) if tokens[i] >= timestamp_begin and tokens[i - 1] >= timestamp_begin]
    if not cuts:
        # No pair of timestamps: one segment up to the last timestamp given, else the whole window.
        duration = window_seconds
        stamps = [t for t in tokens if t >= timestamp_begin]
        if stamps and stamps[-1] != timestamp_begin:
            duration = (stamps[-1] - timestamp_begin) * _TIME_PRECISION
        return [(time_offset, time_offset + duration, tokens)], seek + size
    if ends_complete:
        cuts.append(len(tokens))
    pieces, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        pieces.append((seconds(piece[0]), seconds(piece[-1]), piece))
        last = cut
    if ends_complete:
        return pieces, seek + size
    if final:
        pieces.append((seconds(tokens[last]), time_offset + window_seconds, tokens[last:]))
        return pieces, seek + size
    return pieces, seek + (tokens[last - 1] - timestamp_begin) * _INPUT_STRIDE


def _transcript(parts: list[Segment], language: str, probability: float, samples: int) -> Transcript:
    return Transcript(
        text=" ".join(p.text for p in parts if p.text),
        language=language,
        language_probability=round(float(probability), 4),
        duration=samples / SAMPLE_RATE,
        segments=parts,
    )
