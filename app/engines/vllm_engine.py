"""Qwen3-ASR served by vLLM in this process: the qwen3-asr engine's behaviour, vLLM's decoding.

Everything but the decoding is the transformers Qwen3-ASR engine's (``Qwen3AsrEngine``, which this
subclasses): options checked the same, long audio cut at quiet points, the model's language names
mapped to ISO codes, words timed by the forced aligner (through transformers, as there). What changes
is who runs the language model: one ``vllm.LLM`` owned by this instance. The instance's queue hands it
each request as it comes (``begin``) and steps vLLM (``step``) between arrivals, so vLLM batches
continuously: every chunk of every clip is a sequence of its own in the paged KV cache, a new request
joins those decoding at the next step, and each answer goes back as soon as its last chunk ends, not
when the slowest request beside it does. ``transcribe_batch`` (one ``generate`` call for a list of
clips) does the same decoding for a caller outside the queue. The prompts are the ones the
transformers processor renders; tests check that greedy tokens equal the transformers engine's, both
ways.

Greedy (``beam_size`` 1) and sampled decoding only: the Qwen3-ASR recipe decodes greedily, and vLLM's
beam search is a separate, slower path this engine does not take; a request for beams is refused
rather than decoded some other way.

Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration``, the mixture-of-experts audio-language model) is
served the same way, as a transcription model: vLLM runs its thinker only (no speech out), asked in
the user turn to transcribe the audio, in the requested language when there is one. It names no
language of its own, so without one the transcript's language is "und", as is /detect-language's.

The engine runs in its own environment (``.venv-vllm``, ``scripts/setup.sh --engine vllm``): vLLM pins
a transformers older than the one the qwen3-asr engine is tested with.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.engines.qwen3_asr_engine import (DETECT_SECONDS, DETECT_TOKENS, UNDETERMINED, Qwen3AsrEngine,
                                          _load_checked, _Piece, token_budget)

# vLLM's CPU backend takes its KV cache from this many GiB of host memory (its default is 4); the
# instance's queue bounds how many requests share it.
CPU_KV_CACHE_GIB = "1"
MAX_MODEL_LEN = 4096     # a 30 s chunk is about 400 audio tokens, its text a few hundred more
OMNI = "qwen3_omni_moe"  # the model type of Qwen3-Omni's configuration


@dataclass
class _Begun:
    """A job handed to vLLM: its requests (one per chunk; one for a detection) and the tokens of those
    that have ended."""
    audio: np.ndarray
    pieces: list[_Piece] | None   # None: a language detection
    ids: list[str]
    tokens: dict[str, list[int]] = field(default_factory=dict)


class VllmEngine(Qwen3AsrEngine):
    name = "vllm"

    def __init__(self, llm, *args, omni: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.llm = llm
        self.omni = omni   # Qwen3-Omni's thinker, asked to transcribe, rather than Qwen3-ASR
        self._begun: dict[Hashable, _Begun] = {}
        self._owner: dict[str, Hashable] = {}             # vLLM request id -> the job's key
        self._settled: list[tuple[Hashable, bool, object]] = []   # answered without vLLM

    @property
    def continuous(self) -> bool:
        """Whether the queue may hand jobs over one at a time (``begin``, ``step``): the vLLM release
        at hand lets requests be added to its engine between steps (else each batch is one call)."""
        return hasattr(self.llm, "_add_completion_requests")

    @classmethod
    def load(cls, model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0,
             aligner_model: str = "", chunk_seconds: float = 30.0, tensor_parallel: int = 1,
             max_sequences: int = 64, gpu_memory_mb: int = 0) -> VllmEngine:
        """Load a local Qwen3-ASR directory (either layout: vLLM maps both), or a Qwen3-Omni one,
        without the network.
        On a GPU vLLM takes ``gpu_memory_mb`` of each GPU (weights and KV cache), the memory placement
        charged the instance, instead of its default 90 % of every GPU it sees."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if tensor_parallel == 1:
            # The engine core in this process, not a child: one process per instance, as with every engine.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if cpu_threads > 0 and device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads))
        from transformers import AutoProcessor, Qwen3ASRForTokenClassification
        from vllm import LLM

        from app.engines.torch_common import TORCH_DTYPES, resolve_compute_type

        compute_type = resolve_compute_type(compute_type, device, gpu_default="bfloat16")
        omni = _model_type(model) == OMNI
        on_gpu = {}
        if device == "cuda" and gpu_memory_mb:
            import torch

            total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
            on_gpu["gpu_memory_utilization"] = min(0.95, gpu_memory_mb / total_mb)
        with _flask_proxies_bound():
            # Audio only: no image or video is ever sent, so vLLM reserves nothing for them.
            media = {"audio": 1, "image": 0, "video": 0} if omni else {"audio": 1}
            llm = LLM(model=model, dtype=compute_type, tensor_parallel_size=tensor_parallel,
                      max_model_len=MAX_MODEL_LEN, max_num_seqs=max_sequences, limit_mm_per_prompt=media,
                      enforce_eager=device == "cpu", seed=0, disable_log_stats=True, **on_gpu)
        processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        aligner = aligner_processor = None
        if aligner_model:
            aligner = _load_checked(Qwen3ASRForTokenClassification, aligner_model, TORCH_DTYPES[compute_type],
                                    device, "aligner_model")
            aligner_processor = AutoProcessor.from_pretrained(aligner_model, local_files_only=True)
        return cls(llm, model, device, compute_type, None, processor, aligner, aligner_processor, chunk_seconds,
                   omni=omni)

    def gpu_memory_mb(self) -> int | None:
        return None  # vLLM's memory is its own pool; NVML's per-process figure is what placement reads

    def _check_options(self, options: DecodeOptions) -> None:
        super()._check_options(options)
        if options.beam_size > 1:
            raise ValueError("engine vllm decodes greedily (beam_size 1) or by sampling (temperature > 0), "
                             f"not with {options.beam_size} beams")

    # Decoding -----------------------------------------------------------------------------------

    def prompt(self, language: str | None, prompt: str = "") -> str:
        """The prompt the transformers processor renders for one clip, its audio one placeholder that
        vLLM expands: an optional system turn with the context, the audio, and the assistant turn
        prefilled with ``language <Name><asr_text>`` when the language is forced."""
        conversation = []
        if prompt:
            conversation.append({"role": "system", "content": [{"type": "text", "text": prompt}]})
        if self.omni:  # the thinker is asked, and answers with the text alone
            spoken = f"{self.code_to_name[language]} " if language else ""
            conversation.append({"role": "user", "content": [
                {"type": "audio", "audio": ""}, {"type": "text", "text": f"Transcribe the {spoken}audio into text."}]})
            return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        conversation.append({"role": "user", "content": [{"type": "audio", "audio": ""}]})
        prefill = f"language {self.code_to_name[language]}<asr_text>" if language else ""
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": prefill}]})
        return self.processor.apply_chat_template(conversation, tokenize=False, continue_final_message=True)

    def _requests(self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions],
                  budgets: Sequence[int]) -> tuple[list[dict], list]:
        from vllm import SamplingParams

        requests = [{"prompt": self.prompt(o.language, o.initial_prompt.strip()),
                     "multi_modal_data": {"audio": (np.asarray(a, np.float32), SAMPLE_RATE)}}
                    for a, o in zip(audios, options)]
        params = [SamplingParams(temperature=o.temperature, max_tokens=budget, skip_special_tokens=True)
                  for o, budget in zip(options, budgets)]
        return requests, params

    def generate(self, audios: Sequence[np.ndarray], options: Sequence[DecodeOptions],
                 budgets: Sequence[int]) -> list[list[int]]:
        """New token ids per clip, every clip in one ``LLM.generate`` call (vLLM schedules them)."""
        outputs = self.llm.generate(*self._requests(audios, options, budgets), use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    # Continuous batching: the queue's thread begins jobs as they come and steps vLLM -------------

    def begin(self, key: Hashable, audio: np.ndarray, options: DecodeOptions | None) -> None:
        """Hand one job to vLLM without waiting: a transcription, or with ``options`` None a language
        detection; ``step`` gives its answer under ``key``. Options the engine refuses raise here."""
        audio = np.asarray(audio, dtype=np.float32)
        if options is None:
            if self.omni:   # as detect_language: Qwen3-Omni names none
                self._settled.append((key, True, (UNDETERMINED, None)))
                return
            pieces = None
            calls = [(audio[: DETECT_SECONDS * SAMPLE_RATE], DecodeOptions(beam_size=1), DETECT_TOKENS)]
        else:
            self._check_options(options)
            pieces = self._pieces(0, audio, options)
            calls = [(p.audio, p.options, token_budget(len(p.audio) / SAMPLE_RATE)) for p in pieces]
        added = self.llm._add_completion_requests(*self._requests(*zip(*calls)), use_tqdm=False)
        # vLLM answers (and aborts) by the id LLM gave each request, a number; it returns its own
        # internal id, that number with "-" and a random suffix.
        ids = [rid.split("-", 1)[0] for rid in added]
        self._begun[key] = _Begun(audio, pieces, ids)
        self._owner.update((i, key) for i in ids)

    def step(self) -> list[tuple[Hashable, bool, object]]:
        """One vLLM step over every job begun; ``(key, True, answer)`` or ``(key, False, error)`` for
        each job it finished (its last chunk ended)."""
        finished, self._settled = self._settled, []
        if not self._owner:
            return finished
        for out in self.llm.llm_engine.step():
            key = self._owner.pop(out.request_id, None) if out.finished else None
            if key is None:
                continue
            job = self._begun[key]
            job.tokens[out.request_id] = list(out.outputs[0].token_ids)
            if len(job.tokens) < len(job.ids):
                continue
            del self._begun[key]
            try:
                finished.append((key, True, self._answer(job, [job.tokens[i] for i in job.ids])))
            except Exception as e:  # noqa: BLE001 - that job's error, handed to its request
                finished.append((key, False, e))
        return finished

    def abandon(self) -> None:
        """After a step failed: every job begun is aborted in vLLM and forgotten."""
        try:
            if self._owner:
                self.llm.llm_engine.abort_request(list(self._owner))
        finally:
            self._begun, self._owner, self._settled = {}, {}, []

    def _answer(self, job: _Begun, tokens: list[list[int]]) -> Transcript | tuple[str, None]:
        if job.pieces is None:
            return self._code(self.processor.decode(tokens[0], return_format="parsed")["language"]), None
        texts = [self._parse(row, p.options.language) for row, p in zip(tokens, job.pieces)]
        return self._assemble([job.audio], job.pieces, texts)[0]

    def _parse(self, tokens, forced: str | None) -> tuple[str | None, str]:
        if self.omni:  # the text alone; the language is the one asked for, or none
            return (self.code_to_name[forced] if forced else None,
                    self.processor.tokenizer.decode(tokens, skip_special_tokens=True))
        return super()._parse(tokens, forced)

    def _decode(self, pieces: list[_Piece]) -> list[tuple[str | None, str]]:
        tokens = self.generate([p.audio for p in pieces], [p.options for p in pieces],
                               [token_budget(len(p.audio) / SAMPLE_RATE) for p in pieces])
        return [self._parse(row, p.options.language) for row, p in zip(tokens, pieces)]

    def detect_language(self, audios: Sequence[np.ndarray]) -> list[tuple[str, float | None]]:
        if self.omni:   # Qwen3-Omni names no language when it transcribes: none is invented
            return [(UNDETERMINED, None) for _ in audios]
        clips = [np.asarray(a[: DETECT_SECONDS * SAMPLE_RATE], dtype=np.float32) for a in audios]
        tokens = self.generate(clips, [DecodeOptions(beam_size=1)] * len(clips), [DETECT_TOKENS] * len(clips))
        return [(self._code(self.processor.decode(row, return_format="parsed")["language"]), None) for row in tokens]


def _flask_proxies_bound():
    """A request context of a throwaway Flask app while vLLM starts, when Flask is loaded (in an instance).

    vLLM's CPU platform rebinds kernels by scanning every loaded module's globals with ``hasattr``, and
    Flask's ``request``, ``g``, ``current_app`` and ``session`` are proxies that raise RuntimeError (not
    AttributeError) outside a context: the load failed with "Working outside of application context".
    Bound to an app that serves nothing, they answer the scan; the instance's own app is untouched.
    """
    if "flask" not in sys.modules:
        return contextlib.nullcontext()
    import flask

    return flask.Flask("vllm-start").test_request_context()


def _model_type(model: str) -> str:
    """The ``model_type`` of a model directory's config.json ("" when there is none to read)."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f).get("model_type", "")
    except (OSError, ValueError):
        return ""
