"""A tiny Qwen3-ASR and a tiny Qwen3 forced aligner with random weights, in the transformers (-hf)
layout, built offline in seconds for the qwen3-asr engine's tests.

No Qwen3-ASR weights can be had offline, so the model says nothing meaningful: tests use it for what
crosses the interfaces (a forced language reaches the model, batches equal single decodes, chunks
land on one timeline, refusals), never for words. Its tokenizer is a small byte-level BPE trained here,
with Qwen's chat and audio tokens as special tokens and ``<asr_text>`` as an ordinary added token
(a special one would be dropped by ``skip_special_tokens`` and the output could not be parsed). The
chat templates follow the released checkpoints' layout: an (empty) system turn, the audio in the user
turn, the assistant turn prefilled with ``language <Name><asr_text>`` when a language is forced; the
aligner's user turn lists the words, each followed by its two ``<timestamp>`` slots.
"""
from __future__ import annotations

from pathlib import Path

from app.selfcheck.random_qwen3_asr import ASR_TEMPLATE

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
           "<timestamp>"]
ALIGNER_CLASSES = 400  # 80 ms each: 32 s of audio, more than a chunk
_CORPUS = [
    "language English language Chinese language German language French language None",
    "And so, my fellow Americans, ask not what your country can do for you.",
    "He began a confused complaint against the wizard who had vanished behind the curtain.",
    "我们今天讨论的问题是语音识别。", "Guten Tag, wie geht es Ihnen?",
]

_ASR_TEMPLATE = ASR_TEMPLATE  # the released checkpoints' layout (app/selfcheck/random_qwen3_asr.py)
_ALIGNER_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{ content['text'] + '<timestamp><timestamp>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- endfor %}"
)


def build(out: Path, examples: list[tuple] = (), steps: int = 150, head_dim: int = 16) -> tuple[Path, Path]:
    """Write the model to ``out``/asr and the aligner to ``out``/aligner; return both directories.
    ``head_dim`` 32 is the smallest vLLM's CPU attention runs (the vllm engine's tests).

    ``examples`` are (16 kHz audio, language name, text) the model is taught for ``steps`` steps
    first, so that it names a language and stops: a model that never emits its end token decodes to
    the token budget, which is slow, and never says a language, which leaves detection untested."""
    import torch
    from transformers import (Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration,
                              Qwen3ASRForTokenClassification, Qwen3ASRProcessor)

    asr, aligner = out / "asr", out / "aligner"
    tokenizer = _tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    common = dict(
        audio_config={"model_type": "qwen3_asr_encoder", "d_model": 16, "encoder_layers": 1,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "output_dim": 32,
                      "downsample_hidden_size": 8, "num_mel_bins": 128},
        text_config={"model_type": "qwen3", "vocab_size": len(tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": head_dim, "max_position_embeddings": 8192,
                     "tie_word_embeddings": True},
        audio_token_id=ids["<|audio_pad|>"], timestamp_token_id=ids["<timestamp>"],
        pad_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
    )
    torch.manual_seed(0)
    model = Qwen3ASRForConditionalGeneration(Qwen3ASRConfig(**common))
    processor = Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tokenizer,
                                  chat_template=_ASR_TEMPLATE)
    if examples:
        _teach(model, processor, examples, steps)
    model.save_pretrained(asr)
    processor.save_pretrained(asr)
    Qwen3ASRForTokenClassification(Qwen3ASRConfig(**common, num_labels=ALIGNER_CLASSES)).save_pretrained(aligner)
    Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tokenizer,
                      chat_template=_ALIGNER_TEMPLATE).save_pretrained(aligner)
    return asr, aligner


def taught_examples() -> list[tuple]:
    """One clip each of English, Mandarin and German from ../shared/audio, with the first words of
    its reference: what the tests' model is taught to say."""
    from support import shared_audio, manifest, read_16k_mono

    names = {"en": "English", "zh": "Chinese", "de": "German"}
    examples = []
    for code, name in names.items():
        row = manifest(language=code)[0]
        words = row["reference"][:6] if code == "zh" else " ".join(row["reference"].split()[:4])
        examples.append((read_16k_mono(shared_audio(row["file"])), name, words))
    return examples


def _teach(model, processor, examples: list[tuple], steps: int) -> None:
    """A few steps of teacher forcing on (audio, language, text), one example a step."""
    import torch

    tokenizer = processor.tokenizer
    batches = []
    for audio, language, text in examples:
        inputs = processor.apply_transcription_request(audio=[audio])
        answer = tokenizer(f"language {language}<asr_text>{text}<|im_end|>", return_tensors="pt").input_ids
        prompt = inputs["input_ids"]
        inputs["input_ids"] = torch.cat([prompt, answer], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["labels"] = torch.cat([torch.full_like(prompt, -100), answer], dim=1)
        batches.append(inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def original_layout(hf: Path, out: Path) -> Path:
    """A copy of ``hf`` with its tensors named as in the original (unconverted) Qwen3-ASR release,
    under ``thinker.``: transformers loads it with every weight missing and only a warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, out)
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({f"thinker.{name}": tensor for name, tensor in tensors.items()}, str(out / "model.safetensors"))
    return out


def missing_weights(hf: Path, out: Path) -> Path:
    """A copy of ``hf`` without its audio encoder's weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, out)
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({name: t for name, t in tensors.items() if "audio_tower" not in name}, str(out / "model.safetensors"))
    return out


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS, trainer)
    bpe.add_tokens([AddedToken("<asr_text>", special=False, normalized=False)])
    return Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, bos_token=None,
                          extra_special_tokens={"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                                                "audio_eos_token": "<|audio_end|>"})
