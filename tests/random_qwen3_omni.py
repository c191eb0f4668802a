"""A Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration``) with tiny random layers, and the vllm engine
run on it beside transformers' own thinker: what tests/test_vllm_omni.py runs in the vllm environment.

    .venv-vllm/bin/python tests/random_qwen3_omni.py OUT_DIR REQUEST.json RESULT.json

Run there, not in .venv: the Omni processor's video part needs torchvision, which only .venv-vllm has,
so the transformers reference is the transformers that vLLM pins (5.19). No Qwen3-Omni weights can be
had offline. The model has the released layout (a thinker of an audio encoder, a vision encoder and a
mixture-of-experts Qwen3 with 4 experts, 2 per token, heads of 32; a talker and code2wav, unused;
the audio encoder's weights drawn wide, so that what it hears changes what the model says), the
released special-token ids in a placeholder vocabulary of the real size, and says nothing meaningful:
the test compares tokens, never words.

REQUEST: {"clips": [{"audio": "x.npy", "language": "en"|null, "prompt": "", "budget": 40}, ...]}.
RESULT: {"prompts", "vllm": greedy token ids per clip from one vLLM call, "transformers": the thinker's
greedy ``generate`` per clip on the same prompt and samples (``whole_frames``), "texts": transcribe_batch's text and language per clip,
"decoded": the tokenizer's text of the transformers tokens, "detected"}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOCAB = 151_936
SPECIAL = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645, "<|audio_pad|>": 151_646,
           "<|audio_start|>": 151_647, "<|audio_end|>": 151_648, "<|vision_start|>": 151_652,
           "<|vision_end|>": 151_653, "<|image_pad|>": 151_655, "<|video_pad|>": 151_656}
# The released template's shape for text and audio: each turn's contents in order, audio as its three tokens.
TEMPLATE = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{%- for content in message['content'] %}"
            "{%- if content['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
            "{%- elif content['type'] == 'text' %}{{ content['text'] }}{%- endif %}{%- endfor %}"
            "{{ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def build(out: Path) -> Path:
    import torch
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    thinker = dict(
        vision_start_token_id=SPECIAL["<|vision_start|>"], vision_end_token_id=SPECIAL["<|vision_end|>"],
        audio_end_token_id=SPECIAL["<|audio_end|>"],
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=1, encoder_ffn_dim=64, output_dim=64,
                          downsample_hidden_size=16, num_mel_bins=128, initializer_range=1.0),
        # image_size and apply_vit_abs_pos_embed: what the released vision config carries and vLLM reads
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                           deepstack_visual_indexes=[0], num_position_embeddings=64, image_size=128,
                           apply_vit_abs_pos_embed=True),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6],
                                          "interleaved": True, "mrope_interleaved": True}),
    )
    tiny = dict(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=32, hidden_size=32,
                intermediate_size=64, vocab_size=64)
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker, enable_audio_output=False,
        talker_config=dict(text_config=dict(**tiny, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                                            shared_expert_intermediate_size=16),
                           code_predictor_config=tiny, thinker_hidden_size=64),
        code2wav_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                             intermediate_size=64, codebook_size=64, decoder_dim=32))
    torch.manual_seed(0)
    Qwen3OmniMoeForConditionalGeneration(config).save_pretrained(out)
    Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                          feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=_tokenizer(),
                          chat_template=TEMPLATE).save_pretrained(out)
    return out


def _tokenizer():
    """A byte-level BPE without merges: the released vocabulary's size and special-token ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = dict(SPECIAL)
    fillers = iter(sorted(pre_tokenizers.ByteLevel.alphabet()) + [f"<|placeholder_{i}|>" for i in range(VOCAB)])
    for i in range(VOCAB):
        if i not in SPECIAL.values():
            vocab[next(fillers)] = i
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                          bos_token=None, extra_special_tokens={
                              "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                              "audio_eos_token": "<|audio_end|>", "image_token": "<|image_pad|>",
                              "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
                              "vision_eos_token": "<|vision_end|>"})


def whole_frames(audio: np.ndarray, hop: int = 160) -> np.ndarray:
    """The clip padded with silence to whole 10 ms frames, as vLLM's Qwen3-Omni processor pads every
    clip before its feature extraction. Transformers' processor does not: for a clip that ends inside
    a frame (the 5.256 s German one) its last frame differs, and so, from the 8th token, did the
    greedy tokens. Given the samples vLLM uses, transformers decodes the same tokens."""
    return np.pad(audio, (0, -len(audio) % hop))


def main(out: str, request_path: str, result_path: str) -> None:
    import torch
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from app.engines import load_engine
    from app.engines.base import DecodeOptions

    model = build(Path(out))
    clips = json.loads(Path(request_path).read_text())["clips"]
    audios = [np.load(c["audio"]) for c in clips]
    options = [DecodeOptions(beam_size=1, language=c["language"], initial_prompt=c["prompt"]) for c in clips]
    budgets = [c["budget"] for c in clips]
    engine = load_engine("vllm", str(model), "cpu")
    prompts = [engine.prompt(o.language, o.initial_prompt) for o in options]
    got = engine.generate(audios, options, budgets)
    texts = engine.transcribe_batch(audios, options)
    reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model, dtype=torch.float32).thinker.eval()
    expected = []
    for prompt, audio, budget in zip(prompts, audios, budgets):
        inputs = engine.processor(text=[prompt], audio=[whole_frames(audio)], return_tensors="pt")
        with torch.inference_mode():
            row = reference.generate(**inputs, max_new_tokens=budget, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        expected.append(row.tolist())
    result = {"prompts": prompts, "vllm": got, "transformers": expected,
              "texts": [[t.text, t.language] for t in texts],
              "decoded": [engine.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in expected],
              "detected": [list(d) for d in engine.detect_language(audios)]}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
