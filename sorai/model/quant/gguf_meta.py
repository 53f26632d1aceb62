"""The metadata of a GGUF that sorai writes: copied from a source GGUF, or built from a Hugging
Face directory's config and tokenizer so that llama.cpp (and sorai) load the file on its own."""

from __future__ import annotations

import json
from typing import Any

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.tokenizer import Tokenizer, gguf_pre_name

# Keys the writer sets itself (the header, the architecture, the alignment it pads to, the
# file type of what it writes).
_WRITER_KEYS = ("general.architecture", "general.alignment", "general.file_type")
_WRITER_KEYS += ("general.quantization_version",)


def copy_metadata(reader: Any, writer: Any) -> None:
    """Every key of a source GGUF (gguf.GGUFReader) onto the writer, with its own value type:
    the model's hyperparameters, tokenizer and chat template as they were."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _WRITER_KEYS:
            continue
        kind = field.types[0]
        sub_type = None
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:  # arrays of arrays: no llama-family key has one
                raise ModelFormatError(f"GGUF key {key!r} is a nested array, which is not copied")
            sub_type = field.types[1]
        writer.add_key_value(key, field.contents(), kind, sub_type=sub_type)


def dense_metadata(writer: Any, config: ModelConfig, tokenizer: Tokenizer, name: str) -> None:
    """llama.cpp's keys for a Hugging Face checkpoint: hyperparameters, then the tokenizer."""
    import gguf

    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default"):
        raise ModelFormatError(
            f"rope scaling {kind!r} cannot be written to a GGUF by sorai (supported: linear); "
            "quantize a GGUF of this model instead, or write safetensors"
        )
    tokenizer_metadata(writer, tokenizer, config.vocab_size)


def tokenizer_metadata(writer: Any, tokenizer: Tokenizer, rows: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer (GPT-2 style: SmolLM2, Llama 3, Qwen2),
    one token per embedding row, as llama.cpp's converter writes them."""
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelFormatError(
            f"tokenizer of type {model.get('type')!r} cannot be written to a GGUF by sorai "
            "(supported: byte-level BPE); quantize a GGUF of this model, or write safetensors"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= rows:
        raise ModelFormatError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
            f"{rows} rows; llama.cpp needs one token per row"
        )
    tokens = [f"[PAD{i}]" for i in range(rows)]  # rows no token uses, as llama.cpp pads them
    types = [gguf.TokenType.UNUSED] * rows
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("unk", tokenizer.special_token("unk_token")),
        ("pad", tokenizer.special_token("pad_token")),
    ):
        if (tid := tokenizer.token_to_id(token)) is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
