"""GGUF loading: every supported tensor type, llama.cpp's Q/K permutation, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter
from gguf.quants import quantize

from sorai.errors import ModelFormatError
from sorai.model.gguf import GGUFFile, unpermute_qk
from sorai.model.loader import load_model
from sorai.model.weights import load_gguf, load_hf_dir, save_hf_dir

from .reference import load_reference, write_hf_checkpoint

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# Q4_K and Q6_K have no quantizer in the gguf package: their blocks are made from random bytes
# with sane scales, as (block bytes, offset of the f16 scale fields).
RANDOM_BLOCKS = {QType.Q4_K: (144, [0, 2]), QType.Q6_K: (210, [208])}


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, part = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF[part]}.{kind}"
    return f"{HF_TO_GGUF[stem]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q and K rows (the inverse of our unpermute)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_blocks(shape: tuple[int, int], qtype: QType, rng: np.random.Generator) -> np.ndarray:
    block_bytes, scale_offsets = RANDOM_BLOCKS[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.001, 0.01, size=(rows, cols // 256)).astype(np.float16)
        blocks[..., offset : offset + 2] = (
            scales[..., None].view(np.uint8).reshape(rows, cols // 256, 2)
        )
    return blocks.reshape(rows, -1)


def write_gguf(checkpoint: Path, path: Path, qtype: QType) -> Path:
    """Convert a tiny HF Llama checkpoint to GGUF the way llama.cpp does, at `qtype`."""
    from safetensors.torch import load_file

    config = load_hf_dir(checkpoint, torch.float32).config
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_token_merges([])
    rng = np.random.default_rng(0)
    for hf_name, tensor in load_file(checkpoint / "model.safetensors").items():
        array = tensor.numpy()
        if ".q_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 1 or qtype == QType.F32:
            writer.add_tensor(gguf_name(hf_name), array.astype(np.float32))
        elif qtype in RANDOM_BLOCKS:
            blocks = random_blocks(array.shape, qtype, rng)
            writer.add_tensor(gguf_name(hf_name), blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            data = quantize(array.astype(np.float32), qtype)
            writer.add_tensor(gguf_name(hf_name), data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tie_word_embeddings=False)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids)
    return getattr(out, "logits", out)


IDS = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(3))


def test_f32_gguf_reproduces_the_original_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    path = write_gguf(checkpoint, tmp_path / "model.gguf", QType.F32)
    ours = load_gguf(GGUFFile(path), torch.float32)
    original = load_hf_dir(checkpoint, torch.float32)
    assert (logits(ours, IDS) - logits(original, IDS)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "qtype",
    [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K],
    ids=lambda q: q.name,
)
def test_quantized_gguf_matches_transformers(checkpoint: Path, tmp_path: Path, qtype) -> None:
    path = write_gguf(checkpoint, tmp_path / f"model-{qtype.name}.gguf", qtype)
    ours = load_gguf(GGUFFile(path), torch.float32)
    reference = load_reference(tmp_path, gguf_file=path.name)
    # Against the reference run in float64, no further off than the float32 reference itself
    # (this random model's logits reach ~580, where float32's spacing is 6e-5): summing a norm in
    # another order (sorai/model/rms_norm.c) moves float32 logits by up to ~1e-3 here, about as
    # far from float64's as the reference's own (Q6_K: 8.8e-4 ours, 9.6e-4 the reference's).
    single = logits(reference, IDS)
    exact = logits(reference.double(), IDS)  # in place: after the float32 run
    reference_error = (single - exact).abs().max()
    assert (logits(ours, IDS) - exact).abs().max() <= 1.5 * reference_error + 1e-5


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = torch.arange(8 * 64 * 3, dtype=torch.float32).reshape(8 * 64, 3)
    permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), 8))
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, 8), weight)


def test_truncated_gguf_is_a_clear_format_error(default_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_gguf.read_bytes()[: 1 << 20])
    with pytest.raises(ModelFormatError, match="truncated.gguf"):
        load_model(truncated)


def test_text_file_named_gguf_is_a_clear_format_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(fake)


def test_directory_without_config_json_is_a_clear_format_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(tmp_path)


def test_checkpoint_with_a_missing_weight_names_it(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(ModelFormatError, match="layers.1.mlp.up_proj.weight"):
        load_hf_dir(tmp_path, torch.float32)


def test_corrupt_config_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 32,\n  oops\n}\n')
    with pytest.raises(ModelFormatError, match=r"config.json: line 3"):
        load_hf_dir(tmp_path, torch.float32)


def test_unsupported_gguf_rope_scaling_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "yarn.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_vocab_size(32)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="rope scaling type 'yarn' is not supported"):
        GGUFFile(path).config()


def test_saving_a_model_with_gguf_rope_freqs_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    model = load_hf_dir(checkpoint, torch.float32)
    model.inv_freq = model.inv_freq / 2  # what load_gguf does with a rope_freqs tensor
    with pytest.raises(ModelFormatError, match="rope_freqs"):
        save_hf_dir(model, tmp_path / "out")


def test_second_open_reads_the_index_not_the_file_header(
    checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    import gguf

    path = write_gguf(checkpoint, tmp_path / "model.gguf", QType.Q8_0)
    first = logits(load_gguf(GGUFFile(path), torch.float32), IDS)

    def refuse(*args, **kwargs):
        raise AssertionError("GGUFReader used although the index is current")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    assert torch.equal(logits(load_gguf(GGUFFile(path), torch.float32), IDS), first)


def test_a_rewritten_file_is_read_afresh(checkpoint: Path, tmp_path: Path) -> None:
    path = write_gguf(checkpoint, tmp_path / "model.gguf", QType.Q8_0)
    GGUFFile(path)
    write_gguf(checkpoint, path, QType.F32)  # same path, new size and mtime
    reread = GGUFFile(path)
    assert {info.qtype for info in reread.tensor_infos} == {int(QType.F32)}
