"""Turn a CTranslate2 Whisper model directory into a Hugging Face Whisper checkpoint.

The image embeds only a CTranslate2 model and no model hub is reachable, yet the
transformers engine must run (and be tested) on real weights. CTranslate2's converter
only renamed and fused tensors, so the conversion can be undone exactly; the float16
weights it stored are kept as they are.

    python -m app.engines.ct2_convert CT2_DIR OUT_DIR
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

SUPPORTED_BINARY_VERSION = 6  # ctranslate2 >= 3 writes this layout

# CTranslate2 dtype ids (ctranslate2/specs/model_spec.py); bfloat16 is decoded by hand.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}

# ctranslate2.specs.common_spec.Activation -> transformers' ACT2FN names.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh", 6: "sigmoid"}

# OpenAI's rule (whisper/model.py): English-only vocabularies have 51864 entries, the
# multilingual ones 51865 or more. Language tokens exist in both, so they cannot decide it.
_MULTILINGUAL_MIN_VOCAB = 51865

# openai/whisper's default max_initial_timestamp=1.0 s at 0.02 s per timestamp token.
_MAX_INITIAL_TIMESTAMP_INDEX = 50


class _Reader:
    """Sequential little-endian reader over the bytes of a model.bin."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0]

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        raw = self.data[self.pos : self.pos + length - 1]
        self.pos += length
        return raw.decode("utf-8")

    def array(self, dtype_id: int, dims: list[int], nbytes: int) -> np.ndarray:
        raw = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        dtype = _DTYPES[dtype_id]
        if dtype == "bfloat16":  # the upper half of a float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(dims)
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(dims)


def read_ct2_model(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 model.bin (or the directory holding it).

    Returns the spec name (e.g. "WhisperSpec"), every variable by name as a read-only
    array (scalars are 0-d), and the aliases (alias name -> name of the variable it shares).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    reader = _Reader(path.read_bytes())
    version = reader.unpack("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version}, this reader knows {SUPPORTED_BINARY_VERSION}"
        )
    spec_name = reader.string()
    reader.unpack("I")  # spec revision: the layout of the variables is the same for all Whisper revisions
    variables = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        dims = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype_id = reader.unpack("B")
        variables[name] = reader.array(dtype_id, dims, reader.unpack("I"))
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.pos != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.pos} trailing bytes after the model")
    return spec_name, variables, aliases


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))


class _WeightMapper:
    """Builds the HF state dict from CT2 variables, tracking that every tensor is used once."""

    def __init__(self, variables: dict[str, np.ndarray]):
        self.variables = variables
        self.unused = {name for name, value in variables.items() if value.ndim > 0}
        self.state: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        self.unused.remove(name)
        value = self.variables[name]
        if value.dtype not in (np.float16, np.float32):
            raise ValueError(f"{name} is {value.dtype}: quantized CTranslate2 models cannot be converted")
        return value

    def linear(self, hf: str, ct2: str) -> None:
        self.state[f"{hf}.weight"] = self.take(f"{ct2}/weight")
        self.state[f"{hf}.bias"] = self.take(f"{ct2}/bias")

    def layer_norm(self, hf: str, ct2: str) -> None:
        self.state[f"{hf}.weight"] = self.take(f"{ct2}/gamma")
        self.state[f"{hf}.bias"] = self.take(f"{ct2}/beta")

    def projections(self, hf: str, ct2: str, names: list[str]) -> None:
        """Split a fused projection; HF's k_proj has no bias, CT2 fused zeros in its place."""
        weights = np.split(self.take(f"{ct2}/weight"), len(names))
        biases = np.split(self.take(f"{ct2}/bias"), len(names))
        for name, weight, bias in zip(names, weights, biases):
            self.state[f"{hf}.{name}.weight"] = weight
            if name == "k_proj":
                if np.any(bias):
                    raise ValueError(f"{ct2}: non-zero key bias, not a Whisper attention layer")
            else:
                self.state[f"{hf}.{name}.bias"] = bias

    def block(self, hf: str, ct2: str, cross_attention: bool) -> None:
        self.projections(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        self.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        self.layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        if cross_attention:
            self.projections(f"{hf}.encoder_attn", f"{ct2}/attention/linear_0", ["q_proj"])
            self.projections(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ["k_proj", "v_proj"])
            self.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
            self.layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        self.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        self.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        self.layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")


def whisper_state_dict(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict[str, np.ndarray]:
    """Map WhisperSpec variables to WhisperForConditionalGeneration parameter names.

    proj_out is left out: it is tied to the decoder embeddings, which CT2 records as an alias.
    """
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError("the output projection is not tied to the decoder embeddings")
    mapper = _WeightMapper(variables)
    for conv in ("conv1", "conv2"):
        mapper.linear(f"model.encoder.{conv}", f"encoder/{conv}")
    mapper.state["model.encoder.embed_positions.weight"] = mapper.take("encoder/position_encodings/encodings")
    for i in range(_layer_count(variables, "encoder")):
        mapper.block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross_attention=False)
    mapper.layer_norm("model.encoder.layer_norm", "encoder/layer_norm")
    mapper.state["model.decoder.embed_tokens.weight"] = mapper.take("decoder/embeddings/weight")
    mapper.state["model.decoder.embed_positions.weight"] = mapper.take("decoder/position_encodings/encodings")
    for i in range(_layer_count(variables, "decoder")):
        mapper.block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross_attention=True)
    mapper.layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    if mapper.unused:
        raise ValueError(f"CTranslate2 tensors with no Whisper counterpart: {sorted(mapper.unused)}")
    return {name: np.ascontiguousarray(value) for name, value in mapper.state.items()}


def _ct2_vocabulary(ct2_dir: Path) -> list[str]:
    """The model's tokens in id order: vocabulary.json since ctranslate2 3.x, .txt before."""
    json_file = ct2_dir / "vocabulary.json"
    if json_file.exists():
        return json.loads(json_file.read_text(encoding="utf-8"))
    return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")


def _load_tokenizer(ct2_dir: Path, normalizer_file: Path):
    """The CT2 tokenizer.json as a WhisperTokenizer with the model's whole vocabulary.

    The special tokens are registered in id order so that ``all_special_ids[-1]`` is
    <|notimestamps|>, which the tokenizer uses to find the first timestamp token; the
    timestamp tokens that only the CT2 vocabulary lists are added as ordinary tokens.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    backend = Tokenizer.from_file(str(ct2_dir / "tokenizer.json"))
    special = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    eos = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        tokenizer_object=backend,
        bos_token=eos,
        eos_token=eos,
        unk_token=eos,
        pad_token=eos,
        extra_special_tokens=[t for t in special if t != eos],
        normalizer_file=str(normalizer_file),
    )
    vocabulary = _ct2_vocabulary(ct2_dir)
    if tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) != vocabulary[: len(tokenizer)]:
        raise ValueError(f"{ct2_dir}: tokenizer.json and the model vocabulary disagree")
    extra = vocabulary[len(tokenizer) :]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tokenizer


def _whisper_config(variables: dict[str, np.ndarray], ct2_config: dict, token_id, dtype: str):
    from transformers import WhisperConfig

    embeddings = variables["decoder/embeddings/weight"]
    eos = token_id("<|endoftext|>")
    return WhisperConfig(
        architectures=["WhisperForConditionalGeneration"],
        vocab_size=embeddings.shape[0],
        d_model=embeddings.shape[1],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function=_ACTIVATIONS[int(variables["decoder/activation"])],
        scale_embedding=bool(variables["decoder/scale_embeddings"]),
        decoder_start_token_id=token_id("<|startoftranscript|>"),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        tie_word_embeddings=True,
        dtype=dtype,
    )


def _generation_config(model_config, ct2_config: dict, tokenizer):
    """What WhisperForConditionalGeneration.generate() reads, for timestamps and languages too."""
    from transformers import GenerationConfig

    token_id = tokenizer.convert_tokens_to_ids
    multilingual = model_config.vocab_size >= _MULTILINGUAL_MIN_VOCAB and bool(ct2_config.get("lang_ids"))
    settings = dict(
        decoder_start_token_id=model_config.decoder_start_token_id,
        bos_token_id=model_config.bos_token_id,
        eos_token_id=model_config.eos_token_id,
        pad_token_id=model_config.pad_token_id,
        max_length=model_config.max_target_positions,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        no_timestamps_token_id=token_id("<|notimestamps|>"),
        prev_sot_token_id=token_id("<|startofprev|>"),
        max_initial_timestamp_index=_MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if ct2_config.get("alignment_heads"):  # for word timestamps; older CT2 configs lack it
        settings["alignment_heads"] = [list(head) for head in ct2_config["alignment_heads"]]
    if multilingual:  # generate() detects the language whenever lang_to_id exists, so only here
        lang_tokens = tokenizer.convert_ids_to_tokens(list(ct2_config["lang_ids"]))
        settings["lang_to_id"] = {token: token_id(token) for token in lang_tokens}
        settings["task_to_id"] = {task: token_id(f"<|{task}|>") for task in ("transcribe", "translate")}
    return GenerationConfig(**settings)


def _write_checkpoint(ct2_dir: Path, staging: Path) -> None:
    from safetensors.numpy import save_file
    from transformers import WhisperFeatureExtractor

    spec_name, variables, aliases = read_ct2_model(ct2_dir)
    if spec_name != "WhisperSpec":
        raise ValueError(f"{ct2_dir} holds a {spec_name}, not a WhisperSpec")
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    state = whisper_state_dict(variables, aliases)
    dtype = str(state["model.decoder.embed_tokens.weight"].dtype)

    # WhisperTokenizer.normalize() needs an English spelling map, and hub checkpoints ship
    # one (British -> American spellings). It is not available offline and is not invented
    # here: the map is empty, so normalize() applies every other rule but no respellings.
    normalizer_file = staging / "normalizer.json"
    normalizer_file.write_text("{}\n", encoding="utf-8")
    tokenizer = _load_tokenizer(ct2_dir, normalizer_file)
    tokenizer.model_max_length = int(variables["decoder/position_encodings/encodings"].shape[0])
    tokenizer.save_pretrained(staging)

    config = _whisper_config(variables, ct2_config, tokenizer.convert_tokens_to_ids, dtype)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"{ct2_dir}: {len(tokenizer)} tokens for {config.vocab_size} embeddings")
    config.save_pretrained(staging)
    _generation_config(config, ct2_config, tokenizer).save_pretrained(staging)
    WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16_000, hop_length=160, chunk_length=30, n_fft=400
    ).save_pretrained(staging)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})


def convert_whisper_ct2_to_hf(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an offline-loadable HF Whisper checkpoint for ``ct2_dir`` at ``out_dir``.

    The checkpoint is built in a temporary sibling directory and published with one
    rename, so a reader sees either nothing or a complete checkpoint. If ``out_dir``
    already exists it is kept as is: only finished conversions are ever published there,
    possibly by a concurrent process that won the race.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if out_dir.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_checkpoint(ct2_dir, staging)
        for file in staging.iterdir():
            file.chmod(0o644)  # safetensors and mkstemp-based writers leave 0600
        staging.chmod(0o755)  # mkdtemp creates 0700
        try:
            os.replace(staging, out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
            # another process published its checkpoint first; ours is redundant
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m app.engines.ct2_convert CT2_DIR OUT_DIR", file=sys.stderr)
        return 2
    print(convert_whisper_ct2_to_hf(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
