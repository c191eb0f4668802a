"""A Qwen3-ASR of Qwen3-ASR-1.7B's shape with random weights, built in place: no weights can be had offline.

``build(out, "1.7b", device="cuda", dtype="bfloat16")`` writes, in the transformers (-hf) layout, a
model of ``Qwen3ASRConfig``'s defaults (a 24-layer audio encoder feeding a 28-layer Qwen3 of hidden
size 2048, 151,936 tokens, 2.04 B parameters counted with the head tied to the embedding) for the GPU self-check's batching
throughput and bf16 memory (``app/selfcheck/check.py``): what a batch costs depends on the shape, not on
the weights. ``"tiny"`` is the same layout and vocabulary with tiny layers, for a CPU rehearsal.

Its tokenizer has the real vocabulary's size and the real special-token ids (``<|im_end|>`` 151645,
``<|audio_pad|>`` 151676, ...), so the embedding, the head and the chat template cost what they cost on
the released model: a byte-level BPE without merges whose other entries are placeholders. The model
transcribes nothing meaningful; tests/random_qwen3_asr.py builds the tiny taught one the tests use.
"""
from __future__ import annotations

from pathlib import Path

VOCAB = 151_936
# The released tokenizer's special tokens at their ids; <asr_text> is an ordinary added token there.
SPECIAL_IDS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645,
               "<|audio_start|>": 151_669, "<|audio_end|>": 151_670, "<|audio_pad|>": 151_676,
               "<timestamp>": 151_705}
ASR_TEXT_ID = 151_704

# The released checkpoints' chat template, reduced to what the processor renders: an (empty) system
# turn, the audio in the user turn, the assistant turn prefilled when a language is forced.
ASR_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{ content['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- if not (loop.last and message['role'] == 'assistant') %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> overrides of Qwen3ASRConfig's defaults; "1.7b" is the defaults with the audio encoder's
# output sized to the text model, as in Qwen/Qwen3-ASR-1.7B-hf.
SHAPES = {
    "1.7b": ({"output_dim": 2048}, {}),
    "tiny": ({"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
              "output_dim": 64, "downsample_hidden_size": 16},
             {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32}),
}


def build(out: Path, shape: str = "1.7b", device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Write the model and its processor to ``out``; return ``out``. ``device`` is where the random
    weights are drawn (a GPU draws 2 B of them in a moment)."""
    import torch
    from transformers import (Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration,
                              Qwen3ASRProcessor)

    audio, text = SHAPES[shape]
    config = Qwen3ASRConfig(audio_config={"model_type": "qwen3_asr_encoder", **audio},
                            text_config={"model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": 2048,
                                         "intermediate_size": 6144, "num_hidden_layers": 28,
                                         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                                         "max_position_embeddings": 65536, "tie_word_embeddings": True, **text},
                            audio_token_id=SPECIAL_IDS["<|audio_pad|>"], timestamp_token_id=SPECIAL_IDS["<timestamp>"],
                            pad_token_id=SPECIAL_IDS["<|endoftext|>"],
                            eos_token_id=[SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|im_end|>"]])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ASRForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    del model
    Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tokenizer(),
                      chat_template=ASR_TEMPLATE).save_pretrained(out)
    return out


def tokenizer():
    """A byte-level BPE of the released vocabulary's size and special-token ids, without merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fixed = {**{token: i for token, i in SPECIAL_IDS.items()}, "<asr_text>": ASR_TEXT_ID}
    taken = set(fixed.values())
    vocab = dict(fixed)
    fillers = (t for t in alphabet + [f"<|placeholder_{i}|>" for i in range(VOCAB)])
    for i in range(VOCAB):
        if i not in taken:
            vocab[next(fillers)] = i
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    bpe.add_tokens([AddedToken("<asr_text>", special=False, normalized=False)])
    return Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, bos_token=None,
                          extra_special_tokens={"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                                                "audio_eos_token": "<|audio_end|>"})
